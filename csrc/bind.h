// pybind11 pieces shared by the extension (bindings.cpp, cpu/register_cpu.cpp,
// cuda/register_cuda.cpp) and the CUDA emulator's module (cuda/emu/module.cpp): argument
// classes with named, typed fields, and the export of constants.h.
#pragma once

#include <pybind11/pybind11.h>

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "constants.h"

namespace effattn {
namespace bind {

namespace py = pybind11;

// kDerived: not an argument, set by the class's `finish` from the others; read back only.
enum Need { kRequired, kOptional, kDerived };

// One field of an argument struct S: its keyword, whether a call must give it (or, `with` set,
// give it exactly when it gives the field named so: strides with their pointer), how it is read
// from Python and how it reads back (as the attribute of that name).
template <class S>
struct Field {
  const char* name;
  Need need;
  const char* with;
  void (*load)(S&, py::handle);
  py::object (*show)(const S&);
  const char* kind;  // what load accepts, for errors
};

// Numbers and flags; addresses (data pointers, device addresses, streams) are Python ints;
// element strides (int64_t[N]) a tuple or list of exactly N ints.
template <class T>
void load(py::handle h, T& out) {
  if constexpr (std::is_array<T>::value) {
    constexpr size_t n = std::extent<T>::value;
    if (!PyTuple_Check(h.ptr()) && !PyList_Check(h.ptr())) throw py::cast_error();
    const auto s = py::reinterpret_borrow<py::sequence>(h);
    if (s.size() != n) {
      throw py::value_error("expected " + std::to_string(n) + " strides, got " +
                            std::to_string(s.size()));
    }
    for (size_t i = 0; i < n; ++i) {
      const py::object item = s[i];
      if (!py::isinstance<py::int_>(item)) {
        throw py::type_error("expected ints, element " + std::to_string(i) + " is " +
                             Py_TYPE(item.ptr())->tp_name);
      }
      out[i] = item.cast<int64_t>();
    }
  } else if constexpr (std::is_pointer<T>::value) {
    out = reinterpret_cast<T>(h.cast<uintptr_t>());
  } else {
    out = h.cast<T>();
  }
}

template <class T>
py::object show(const T& v) {
  if constexpr (std::is_array<T>::value) {
    py::tuple t(std::extent<T>::value);
    for (size_t i = 0; i < std::extent<T>::value; ++i) t[i] = py::int_(v[i]);
    return t;
  } else if constexpr (std::is_pointer<T>::value) {
    return py::int_(reinterpret_cast<uintptr_t>(v));
  } else {
    return py::cast(v);
  }
}

// What load accepts, for errors.
template <class T>
const char* kind_of(const T&) {
  if constexpr (std::is_array<T>::value) return "a tuple of ints";
  if constexpr (std::is_pointer<T>::value) return "an int (address)";
  if constexpr (std::is_same<T, bool>::value) return "a bool";
  if constexpr (std::is_floating_point<T>::value) return "a float";
  return "an int";
}

// Field `member` of struct S under the member's own name: required or optional, or optional and
// given together with field `with`.
#define EFFATTN_FIELD_(S, member, need, with)                                                 \
  ::effattn::bind::Field<S> {                                                                 \
    #member, ::effattn::bind::need, with,                                                     \
        [](S& s, ::pybind11::handle h) { ::effattn::bind::load(h, s.member); },               \
        [](const S& s) { return ::effattn::bind::show(s.member); },                           \
        ::effattn::bind::kind_of(S{}.member)                                                  \
  }
#define EFFATTN_FIELD(S, member, need) EFFATTN_FIELD_(S, member, need, nullptr)
#define EFFATTN_FIELD_WITH(S, member, with) EFFATTN_FIELD_(S, member, kOptional, #with)

// Binds S as the Python class `name`, constructed from keyword arguments only, one per field:
// a missing required field, an unknown keyword or a field given without its companion is a
// TypeError naming it, and so is a value of the wrong kind; an optional field left out (or
// given None) keeps the default of S, which means "absent". `finish` then validates the fields
// together and sets the derived ones. The fields read back as attributes.
template <class S>
py::class_<S> struct_class(py::module_& m, const char* name, const char* doc,
                           std::vector<Field<S>> fields, void (*finish)(S&) = nullptr) {
  constexpr size_t kMaxFields = 128;
  struct Spec {
    std::string cls;
    std::vector<Field<S>> fields;
    std::vector<py::handle> keys;  // interned names of the fields, for fast lookups
    std::vector<int> partner;      // index of the `with` field, or -1
    void (*finish)(S&);
  };
  if (fields.size() > kMaxFields) throw std::logic_error(std::string(name) + ": too many fields");
  // Lives as long as the process: freeing it would release Python objects after the
  // interpreter has gone.
  auto* spec = new Spec{name, std::move(fields), {}, {}, finish};
  for (const Field<S>& f : spec->fields) {
    PyObject* key = PyUnicode_InternFromString(f.name);
    if (key == nullptr) throw py::error_already_set();
    spec->keys.push_back(key);
    int partner = -1;
    for (size_t j = 0; f.with != nullptr && j < spec->fields.size(); ++j)
      if (std::string(f.with) == spec->fields[j].name) partner = static_cast<int>(j);
    if (f.with != nullptr && partner < 0)
      throw std::logic_error(std::string(name) + "." + f.name + ": no field " + f.with);
    spec->partner.push_back(partner);
  }
  // Module-local: the extension and the CUDA emulator's module bind the same structs, and
  // both can be loaded in one process (the tests).
  py::class_<S> cls(m, name, doc, py::module_local());
  cls.def(py::init([spec](const py::args& args, const py::kwargs& kwargs) {
    const std::string& what = spec->cls;
    if (!args.empty()) throw py::type_error(what + "() takes keyword arguments only");
    S s{};
    bool given[kMaxFields];
    size_t known = 0;
    for (size_t i = 0; i < spec->fields.size(); ++i) {
      const Field<S>& f = spec->fields[i];
      given[i] = false;
      if (f.need == kDerived) continue;
      PyObject* value = PyDict_GetItemWithError(kwargs.ptr(), spec->keys[i].ptr());
      if (value == nullptr && PyErr_Occurred()) throw py::error_already_set();
      known += value != nullptr;
      given[i] = value != nullptr && value != Py_None;
      if (!given[i]) {
        if (f.need == kOptional) continue;
        throw py::type_error(what + "() missing required argument '" + f.name + "'");
      }
      try {
        f.load(s, value);
      } catch (const py::cast_error&) {
        throw py::type_error(what + "(): " + f.name + " must be " + f.kind + ", got " +
                             Py_TYPE(value)->tp_name);
      } catch (const py::type_error& e) {
        throw py::type_error(what + "(): " + f.name + ": " + e.what());
      } catch (const py::value_error& e) {
        throw py::value_error(what + "(): " + f.name + ": " + e.what());
      }
    }
    if (known != kwargs.size()) {
      for (const auto& item : kwargs) {
        const std::string key = py::str(item.first);
        bool found = false;
        for (const Field<S>& f : spec->fields)
          found = found || (f.need != kDerived && key == f.name);
        if (!found) throw py::type_error(what + "() got an unexpected argument '" + key + "'");
      }
    }
    for (size_t i = 0; i < spec->fields.size(); ++i) {
      const int j = spec->partner[i];
      if (j >= 0 && given[i] != given[j]) {
        throw py::type_error(what + "(): " + spec->fields[i].name + " and " +
                             spec->fields[j].name + " go together, got only " +
                             spec->fields[given[i] ? i : j].name);
      }
    }
    if (spec->finish != nullptr) spec->finish(s);
    return s;
  }));
  for (const Field<S>& f : spec->fields) cls.def_property_readonly(f.name, f.show);
  return cls;
}

// ValueError "<what>: <field> is required" unless the address is set.
inline void need(const void* address, const char* what, const char* field) {
  if (address == nullptr) throw py::value_error(std::string(what) + ": " + field + " is required");
}
inline void need(uintptr_t address, const char* what, const char* field) {
  need(reinterpret_cast<const void*>(address), what, field);
}

// The constants of constants.h, as module attributes: TERM_FIELDS (the names of a term's
// fields in their packed order), GROUP_EQ / GROUP_LT / GROUP_NE and DTYPE_CODES (torch dtype
// name -> code).
inline void export_constants(py::module_& m) {
#define EFFATTN_X(name) #name,
  const char* names[] = {EFFATTN_TERM_FIELDS(EFFATTN_X)};
#undef EFFATTN_X
  py::tuple fields(static_cast<size_t>(term::kNumFields));
  for (int i = 0; i < term::kNumFields; ++i) fields[i] = py::str(names[i]);
  m.attr("TERM_FIELDS") = fields;
  m.attr("GROUP_EQ") = static_cast<int>(kGroupEq);
  m.attr("GROUP_LT") = static_cast<int>(kGroupLt);
  m.attr("GROUP_NE") = static_cast<int>(kGroupNe);
  py::dict codes;
#define EFFATTN_X(code, name) codes[#name] = static_cast<int>(code);
  EFFATTN_DTYPES(EFFATTN_X)
#undef EFFATTN_X
  m.attr("DTYPE_CODES") = codes;
}

}  // namespace bind
}  // namespace effattn
