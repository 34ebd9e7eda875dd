// The fastpref op library, device-agnostic: the schemas of every op (TORCH_LIBRARY), the op
// fastpref::native_loss (the forward op with its hand-written backward attached in C++), and the
// Python module fastpref._C whose import loads the library. The ops' CPU kernels are in
// cpu/ops.cpp, their CUDA kernels (when built) in cuda/ops.cpp; this unit has no device code.
//
//   native_loss(model_pred, ref_pred, target, ema_preds, soft_label, settings, modes)
//       -> (loss, pair_stats, sample_err, accuracy)
//
// takes native_forward's arguments and returns its outputs without `coef`, which it keeps for the
// backward (native_backward), so that an eager call neither runs a Python autograd.Function nor has
// the autograd engine call back into Python for the backward. It mirrors
// fastpref.loss.autograd.FusedAdaptiveDPO exactly: the same two ops, only model_pred gets a
// gradient, `coef`, model_pred and target are saved, the stats never get a gradient, an undefined
// incoming gradient gives no gradient, and the gradient itself is not differentiable (under
// create_graph=True it comes back with a node that raises when differentiated, like
// @once_differentiable, but whether or not the incoming gradient requires grad).
//
// Kernels: Autograd (the torch::autograd::Function below) and, for calls that skip autograd
// (torch.inference_mode), native_loss_below_autograd, registered for CPU here and for CUDA by
// cuda/ops.cpp. Both call native_forward / native_backward through the dispatcher, which picks the
// inputs' device; the outputs are allocated by those ops, on that device. The fake
// implementations are registered in Python (fastpref/loss/native.py). torch.compile traces the
// op too: AOTAutograd runs this autograd kernel on fake tensors, so its graphs hold native_forward
// (forward) and native_backward (backward), the same ops the Python FusedAdaptiveDPO path gives.
//
// This is the only translation unit that includes the autograd headers: they make it about as
// slow to compile as the kernels' unit (~17 s of CPU), and ninja builds the two in parallel.

#include <Python.h>

#include <array>
#include <memory>
#include <optional>
#include <tuple>
#include <vector>

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/library.h>

#include "common/options.h"
#include "cpu/kernels.h"
#include "library.h"

namespace fastpref {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using ForwardSig = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                                      at::TensorList, const std::optional<Tensor>&,
                                                                      at::ArrayRef<double>, at::IntArrayRef);
using BackwardSig = Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&);
using LossOutputs = std::tuple<Tensor, Tensor, Tensor, Tensor>;

// The two ops (kernels in cpu/ops.cpp, cuda/ops.cpp), called through the dispatcher (looked up once, on first use).
const c10::TypedOperatorHandle<ForwardSig>& forward_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("fastpref::native_forward", "").typed<ForwardSig>();
  return op;
}

const c10::TypedOperatorHandle<BackwardSig>& backward_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("fastpref::native_backward", "").typed<BackwardSig>();
  return op;
}

constexpr const char* kTwiceMessage =
    "fastpref::native_loss: trying to differentiate twice: the gradient of the fused loss is not differentiable "
    "(double backward is not supported; backend='torch' supports it)";

// The stats outputs travel through a pointer argument rather than as outputs of the Function:
// tensors made inside forward() (grad mode off) and not returned are plain tensors with no
// autograd history, which is what mark_non_differentiable would give, without the output
// bookkeeping (and compiled autograd rejects a C++ Function that marks outputs non-differentiable).
using Stats = std::array<Tensor, 3>;  // pair_stats, sample_err, accuracy

struct LossFunction : public torch::autograd::Function<LossFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& model_pred, const Tensor& ref_pred,
                               const Tensor& target, at::TensorList ema_preds, const std::optional<Tensor>& soft_label,
                               at::ArrayRef<double> settings, at::IntArrayRef modes, Stats* stats) {
    Tensor loss, coef;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      std::tie(loss, coef, (*stats)[0], (*stats)[1], (*stats)[2]) =
          forward_op().call(model_pred, ref_pred, target, ema_preds, soft_label, settings, modes);
    }
    ctx->save_for_backward({coef, model_pred, target});
    ctx->set_materialize_grads(false);
    // backward() returns one entry per argument of forward() after ctx, a tensor list counting
    // one per element: model_pred, ref_pred, target, the K EMA predictions, soft_label,
    // settings, modes, stats.
    ctx->saved_data["n_args"] = static_cast<int64_t>(ema_preds.size()) + 7;
    return {loss};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    // Unpacked first and unconditionally, as FusedAdaptiveDPO does: a second backward after the
    // buffers were freed, or an in-place change of a saved input, raises here.
    const variable_list saved = ctx->get_saved_variables();
    variable_list grads(static_cast<size_t>(ctx->saved_data["n_args"].toInt()));
    const Tensor& grad_loss = grad_outputs[0];
    if (!ctx->needs_input_grad(0) || !grad_loss.defined()) {
      return grads;
    }
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;  // records no graph, as under no_grad
      grads[0] = backward_op().call(grad_loss, saved[0], saved[1], saved[2]);
    }
    // Not differentiable: when the engine records a graph of this backward (create_graph=True),
    // the gradient becomes the output of a node that raises if differentiated (DelayedError, what
    // @once_differentiable uses), with edges to model_pred and grad_loss, the tensors the true
    // gradient depends on. Unlike @once_differentiable it is attached whether or not grad_loss
    // requires grad (the gradient always depends on model_pred), and a path from a function of the
    // gradient (a gradient penalty) to model_pred goes through it: double backward raises, it never
    // silently drops the term. Without create_graph (grad mode off) this costs nothing.
    if (torch::autograd::GradMode::is_enabled()) {
      auto error = std::make_shared<torch::autograd::DelayedError>(kTwiceMessage, 3);
      grads[0] = error->apply({grads[0], saved[1], grad_loss})[0];
    }
    return grads;
  }
};

LossOutputs native_loss_autograd(const Tensor& model_pred, const Tensor& ref_pred, const Tensor& target,
                                 at::TensorList ema_preds, const std::optional<Tensor>& soft_label,
                                 at::ArrayRef<double> settings, at::IntArrayRef modes) {
  Stats stats;
  variable_list loss = LossFunction::apply(model_pred, ref_pred, target, ema_preds, soft_label, settings, modes, &stats);
  return {loss[0], stats[0], stats[1], stats[2]};
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor, Tensor> native_loss_below_autograd(const Tensor& model_pred, const Tensor& ref_pred,
                                                                      const Tensor& target, at::TensorList ema_preds,
                                                                      const std::optional<Tensor>& soft_label,
                                                                      at::ArrayRef<double> settings,
                                                                      at::IntArrayRef modes) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  auto [loss, coef, pair_stats, sample_err, accuracy] =
      forward_op().call(model_pred, ref_pred, target, ema_preds, soft_label, settings, modes);
  return {loss, pair_stats, sample_err, accuracy};
}

}  // namespace fastpref

// Other translation units (the CPU kernels, CUDA kernels) add kernels with TORCH_LIBRARY_IMPL.
TORCH_LIBRARY(fastpref, m) {
  m.set_python_module("fastpref.loss.native");  // where the fake (meta) implementations live
  m.def(
      "native_forward(Tensor model_pred, Tensor ref_pred, Tensor target, Tensor[] ema_preds, Tensor? soft_label, "
      "float[] settings, int[] modes) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
  m.def("native_backward(Tensor grad_loss, Tensor coef, Tensor model_pred, Tensor target) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  m.def(
      "native_loss(Tensor model_pred, Tensor ref_pred, Tensor target, Tensor[] ema_preds, Tensor? soft_label, "
      "float[] settings, int[] modes) -> (Tensor, Tensor, Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
}

TORCH_LIBRARY_IMPL(fastpref, Autograd, m) { m.impl("native_loss", &fastpref::native_loss_autograd); }

TORCH_LIBRARY_IMPL(fastpref, CPU, m) { m.impl("native_loss", &fastpref::native_loss_below_autograd); }

// ---------------------------------------------------------------------------------------------
// The Python module fastpref._C: importing it loads this library (and so registers the ops).
// ---------------------------------------------------------------------------------------------

namespace {

PyObject* py_cpu_isa(PyObject*, PyObject*) { return PyUnicode_FromString(fastpref::cpu::active_isa()); }

PyObject* py_cpu_isas(PyObject*, PyObject*) {
  PyObject* names = PyList_New(0);
  if (names == nullptr) return nullptr;
  for (const char* isa : fastpref::cpu::supported_isas()) {
    PyObject* name = PyUnicode_FromString(isa);
    if (name == nullptr || PyList_Append(names, name) != 0) {
      Py_XDECREF(name);
      Py_DECREF(names);
      return nullptr;
    }
    Py_DECREF(name);
  }
  return names;
}

PyObject* py_set_cpu_isa(PyObject*, PyObject* arg) {
  const char* name = PyUnicode_AsUTF8(arg);
  if (name == nullptr) return nullptr;
  if (!fastpref::cpu::use_isa(name)) {
    PyErr_Format(PyExc_ValueError, "instruction set %s is not built or not supported by this CPU", name);
    return nullptr;
  }
  Py_RETURN_NONE;
}

// {option: {member: code}} of common/options.h, options in `modes` order.
PyObject* py_option_codes(PyObject*, PyObject*) {
  PyObject* options = PyDict_New();
  if (options == nullptr) return nullptr;
  for (int slot = 0; slot < fastpref::kNumModeSlots; ++slot) {
    PyObject* codes = PyDict_New();
    if (codes == nullptr || PyDict_SetItemString(options, fastpref::kModeOptionNames[slot], codes) != 0) {
      Py_XDECREF(codes);
      Py_DECREF(options);
      return nullptr;
    }
    Py_DECREF(codes);  // `options` holds it
    for (const fastpref::OptionCode& entry : fastpref::kOptionCodes) {
      if (entry.slot != slot) continue;
      PyObject* code = PyLong_FromLongLong(entry.code);
      if (code == nullptr || PyDict_SetItemString(codes, entry.name, code) != 0) {
        Py_XDECREF(code);
        Py_DECREF(options);
        return nullptr;
      }
      Py_DECREF(code);
    }
  }
  return options;
}

// `out[enum_name] = {member: slot}` for the entries of one slot table, in table order.
template <size_t N>
bool add_slots(PyObject* out, const char* enum_name, const fastpref::SlotName (&table)[N]) {
  PyObject* slots = PyDict_New();
  if (slots == nullptr || PyDict_SetItemString(out, enum_name, slots) != 0) {
    Py_XDECREF(slots);
    return false;
  }
  Py_DECREF(slots);  // `out` holds it
  for (const fastpref::SlotName& entry : table) {
    PyObject* slot = PyLong_FromLong(entry.slot);
    if (slot == nullptr || PyDict_SetItemString(slots, entry.name, slot) != 0) {
      Py_XDECREF(slot);
      return false;
    }
    Py_DECREF(slot);
  }
  return true;
}

// {"SettingSlot": {member: slot}, "ModeSlot": {member: slot}} of common/options.h.
PyObject* py_op_slots(PyObject*, PyObject*) {
  PyObject* out = PyDict_New();
  if (out == nullptr) return nullptr;
  if (!add_slots(out, "SettingSlot", fastpref::kSettingSlots) || !add_slots(out, "ModeSlot", fastpref::kModeSlots)) {
    Py_DECREF(out);
    return nullptr;
  }
  return out;
}

PyMethodDef kMethods[] = {
    {"cpu_isa", py_cpu_isa, METH_NOARGS, "Instruction set of the CPU kernels in use: 'base', 'avx2' or 'avx512'."},
    {"cpu_isas", py_cpu_isas, METH_NOARGS, "Instruction sets built into fastpref._C that this CPU supports."},
    {"_set_cpu_isa", py_set_cpu_isa, METH_O,
     "Use the kernels of another supported instruction set (for tests; results are bitwise identical)."},
    {"option_codes", py_option_codes, METH_NOARGS,
     "The option codes the kernels read, {option: {member: code}}, as in fastpref.loss.options."},
    {"op_slots", py_op_slots, METH_NOARGS,
     "The positions the kernels read in the ops' settings and modes, {enum: {member: slot}}, as in "
     "fastpref.loss.options."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef kModule = {
    PyModuleDef_HEAD_INIT,
    "fastpref._C",
    "fastpref's native kernels: importing this module registers the ops fastpref::native_forward, "
    "fastpref::native_backward and fastpref::native_loss.",
    -1,
    kMethods,
};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&kModule); }
