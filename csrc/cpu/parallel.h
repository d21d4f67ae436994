// Thread count shared by the CPU kernels.
//
// Use it explicitly in every parallel region, e.g.
//   #pragma omp parallel for num_threads(effattn::num_threads())
// so that set_num_threads() applies whichever Python thread calls the kernel (OpenMP's own
// omp_set_num_threads only changes the calling thread's setting).
#pragma once

namespace effattn {

int num_threads();           // >= 1
void set_num_threads(int n);  // n >= 1

}  // namespace effattn
