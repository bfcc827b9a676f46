#pragma once
// Element types the launch APIs accept; the torch binding maps at::ScalarType onto these.
namespace deepkernels {
enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2, kFloat8E4M3 = 3 };
}
