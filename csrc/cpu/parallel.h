// Default thread count of the CPU kernels.
//
// Every kernel call carries its own thread count (effattn/ops/cpu.py passes
// torch.get_num_threads(), so the kernels follow torch.set_num_threads); this setting is the
// default for callers of effattn._C that pass none. The threads themselves come from
// cpu::parallel_for (kernels.h).
#pragma once

namespace effattn {

int num_threads();            // >= 1
void set_num_threads(int n);  // n >= 1

}  // namespace effattn
