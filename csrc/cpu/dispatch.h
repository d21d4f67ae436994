// Kernel tables available on this CPU, widest instruction set first.
#pragma once

#include <string>
#include <vector>

#include "cpu/kernels.h"

namespace effattn {
namespace cpu {

std::vector<Kernels> available_kernels();

// The table for `isa` ("avx512", "avx2", "generic"; "" or "auto" = the widest available), or
// one with a null name when that instruction set is not available here.
Kernels select_kernels(const std::string& isa);

}  // namespace cpu
}  // namespace effattn
