// fastnoise._C: operator schemas (declared once, here) and the Python module shell.
// Kernels: csrc/cpu/*.cpp (CPU) and csrc/cuda/*.cu (CUDA, when built with nvcc).
#include <Python.h>

#include <torch/library.h>

#ifndef FASTNOISE_WITH_CUDA
#define FASTNOISE_WITH_CUDA 0
#endif

extern "C" {
// A plain (empty) Python module, so that `import fastnoise._C` loads the .so and runs the
// static TORCH_LIBRARY registrations below; the ops live in torch.ops.fastnoise.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "fastnoise compiled kernels (ops in torch.ops.fastnoise)",
      -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace fastnoise {
namespace {
bool cuda_built() { return FASTNOISE_WITH_CUDA != 0; }
}  // namespace
}  // namespace fastnoise

TORCH_LIBRARY(fastnoise, m) {
  // noise: 0 uniform, 1 gaussian, 2 bernoulli. seed/offset: uint64 passed as int64 bits.
  // embed_scale: Gemma's scaled embedding (forward: e = dtype(e * embed_scale) before the
  // noise; backward: embed_scale * the summed grad rows); 1.0 = unscaled.
  // seed_tensor: None, or an int64 (1,) tensor on the weight's device whose value (uint64
  // bits) overrides seed, with offset 0; the CUDA kernel reads it in-kernel (CUDA-graph
  // safe: no host sync). Ids out of range: CPU raises, CUDA writes NaN rows and, with an
  // `error` buffer (int64 (4,) on the weight's device, contract C1), records error[1] = the
  // bad id, error[2] = V, then error[0] = 1.
  m.def(
      "embedding_forward(Tensor ids, Tensor weight, Tensor(a!) out, int noise, float mag, "
      "Tensor? tok_mag, int seed, int offset, bool symmetric, float embed_scale=1.0, "
      "Tensor? seed_tensor=None, Tensor(b!)? error=None) -> ()");
  m.def(
      "embedding_backward(Tensor grad_out, Tensor ids, int num_weights, int? padding_idx, "
      "bool symmetric, bool deterministic, float embed_scale=1.0) -> Tensor");
  // stds: None (statistics per contract C2), or one std per tensor used as std64 (C5).
  m.def(
      "noisytune_(Tensor(a!)[] tensors, float lam, int seed, int[] starts, "
      "float[]? stds=None) -> ()");
  // Whether the CUDA kernels were compiled into this build.
  m.def("cuda_built() -> bool", &fastnoise::cuda_built);
}
