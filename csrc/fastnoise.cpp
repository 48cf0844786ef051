// fastnoise._C: operator schemas (declared once, here) and the Python module shell.
// Kernels: csrc/cpu/*.cpp (CPU) and csrc/cuda/*.cu (CUDA, when built with nvcc).
#include <Python.h>

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/library.h>

#include <array>
#include <mutex>

#include "noisy_embedding.h"

#ifndef FASTNOISE_WITH_CUDA
#define FASTNOISE_WITH_CUDA 0
#endif

namespace fastnoise {
namespace {
bool cuda_built() { return FASTNOISE_WITH_CUDA != 0; }

// The error buffers fastnoise.errors made (outside any CUDA graph capture), per device:
// slot 0 the CPU, slot 1 + i cuda:i.
constexpr size_t kSlots = 65;
std::mutex g_error_mutex;
std::array<at::Tensor, kSlots> g_error_buffers;

size_t error_slot(const c10::Device& device) {
  if (device.is_cpu()) return 0;
  TORCH_CHECK(device.is_cuda() && device.has_index() && device.index() + 1 < (int)kSlots,
              "fastnoise: no error buffer slot for ", device);
  return static_cast<size_t>(device.index()) + 1;
}

void set_error_buffer(const at::Tensor& buffer) {
  TORCH_CHECK_VALUE(buffer.scalar_type() == at::kLong && buffer.numel() == 4 &&
                        buffer.is_contiguous(),
                    "fastnoise: an error buffer is a contiguous int64 tensor of 4 elements");
  std::lock_guard<std::mutex> lock(g_error_mutex);
  g_error_buffers[error_slot(buffer.device())] = buffer;
}
}  // namespace

at::Tensor registered_error_buffer(const c10::Device& device) {
  std::lock_guard<std::mutex> lock(g_error_mutex);
  const at::Tensor& buffer = g_error_buffers[error_slot(device)];
  TORCH_CHECK(buffer.defined(), "fastnoise: no error buffer is registered for ", device,
              ": call fastnoise.errors.error_buffer(device) once, outside any CUDA graph "
              "capture (NoisyEmbedding, patch and noisy_embedding do)");
  return buffer;
}
}  // namespace fastnoise

// ---------------------------------------------------------------------------------------
// The Python module: `import fastnoise._C` loads the .so (running the TORCH_LIBRARY
// registrations below) and gives eager callers a direct entry to the user-facing op.
// ---------------------------------------------------------------------------------------
namespace {

std::optional<at::Tensor> optional_tensor(PyObject* obj) {
  if (obj == Py_None) return std::nullopt;
  return THPVariable_Unpack(obj);
}

at::Tensor tensor_arg(PyObject* obj, const char* name) {
  if (!THPVariable_Check(obj)) {
    PyErr_Format(PyExc_TypeError, "fastnoise: %s must be a tensor, got %s", name,
                 Py_TYPE(obj)->tp_name);
    throw python_error();
  }
  return THPVariable_Unpack(obj);
}

std::optional<at::Tensor> optional_tensor_arg(PyObject* obj, const char* name) {
  if (obj == Py_None) return std::nullopt;
  return tensor_arg(obj, name);
}

int64_t int_arg(PyObject* obj) {
  const int64_t v = PyLong_AsLongLong(obj);
  if (v == -1 && PyErr_Occurred()) throw python_error();
  return v;
}

double float_arg(PyObject* obj) {
  const double v = PyFloat_AsDouble(obj);
  if (v == -1.0 && PyErr_Occurred()) throw python_error();
  return v;
}

// _C.noisy_embedding(weight, ids, attention_mask, position_ids, cu_seqlens, noise, alpha,
// seed, offset, draw_seed, symmetric, padding_idx, embed_scale): torch.ops.fastnoise.
// noisy_embedding with the arguments parsed here (positional only, no schema matching), then
// one dispatcher call (autograd included). What eager calls use; torch.compile traces the op.
PyObject* py_noisy_embedding(PyObject* /*self*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 13) {
    PyErr_Format(PyExc_TypeError, "fastnoise._C.noisy_embedding takes 13 arguments (%zd given)",
                 nargs);
    return nullptr;
  }
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fastnoise::noisy_embedding", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&,
                                         const std::optional<at::Tensor>&,
                                         const std::optional<at::Tensor>&,
                                         const std::optional<at::Tensor>&, int64_t, double,
                                         int64_t, int64_t, bool, bool, int64_t, double)>();
  const at::Tensor weight = tensor_arg(args[0], "weight");
  const at::Tensor ids = tensor_arg(args[1], "input");
  const auto mask = optional_tensor_arg(args[2], "attention_mask");
  const auto positions = optional_tensor_arg(args[3], "position_ids");
  const auto cu = optional_tensor_arg(args[4], "cu_seqlens");
  const int64_t noise = int_arg(args[5]);
  const double alpha = float_arg(args[6]);
  const int64_t seed = int_arg(args[7]);
  const int64_t offset = int_arg(args[8]);
  const bool draw_seed = PyObject_IsTrue(args[9]) == 1;
  const bool symmetric = PyObject_IsTrue(args[10]) == 1;
  const int64_t padding_idx = int_arg(args[11]);
  const double embed_scale = float_arg(args[12]);
  at::Tensor out;
  {
    pybind11::gil_scoped_release no_gil;
    out = op.call(weight, ids, mask, positions, cu, noise, alpha, seed, offset, draw_seed,
                  symmetric, padding_idx, embed_scale);
  }
  return THPVariable_Wrap(std::move(out));
  END_HANDLE_TH_ERRORS
}

PyMethodDef g_methods[] = {
    {"noisy_embedding", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(
                            &py_noisy_embedding)),
     METH_FASTCALL, "torch.ops.fastnoise.noisy_embedding, parsed without schema matching"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "fastnoise compiled kernels (ops in torch.ops.fastnoise)",
      -1, g_methods};
  return PyModule_Create(&module_def);
}
}

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

  // The user-facing op (fastnoise.noisy_embedding): ids of any shape -> (*ids.shape, d), or
  // (2 * ids.shape[0], *ids.shape[1:], d) for a symmetric pair. The scale is alpha /
  // sqrt(L * d), L = ids.shape[-1], or per token from attention_mask / position_ids /
  // cu_seqlens (reference.token_scale), computed inside. draw_seed: the seed is drawn from
  // torch's default generator of the device (on CUDA its Philox seed and offset, safe under
  // graph capture) and XORed with `seed` (rank-distinct noise); else (seed, offset) are used.
  // padding_idx -1 = none. embed_scale (rounded to the weight's dtype here) scales the rows
  // first (Gemma). Bad ids: CPU raises at once; CUDA writes NaN rows and records the id in the
  // device's error buffer (C1), as it does for invalid packing inputs (NaN scale; the CPU
  // records those too). Autograd (the weight's gradient) is registered in C++.
  m.def(
      "noisy_embedding(Tensor weight, Tensor ids, Tensor? attention_mask, Tensor? position_ids, "
      "Tensor? cu_seqlens, int noise, float alpha, int seed, int offset, bool draw_seed, "
      "bool symmetric, int padding_idx, float embed_scale) -> Tensor",
      {at::Tag::nondeterministic_seeded});
  // The weight's gradient from grad_out shaped like noisy_embedding's output: embed_scale *
  // the summed rows per id (a pair's halves summed), float32 accumulation (float64 for float64).
  m.def(
      "noisy_embedding_backward(Tensor grad_out, Tensor ids, int num_weights, int padding_idx, "
      "bool symmetric, float embed_scale) -> Tensor");
  // Registers fastnoise.errors' buffer of its device (made outside any CUDA graph capture).
  m.def("set_error_buffer(Tensor buffer) -> ()", &fastnoise::set_error_buffer);
}
