// deepkernels._emu: the torch binding of the emulated kernels. The same torch_bindings.cpp as the CUDA build
// (its checks, params structs and launch calls), registered as CPU kernels of namespace deepkernels_emu;
// deepkernels/_ops.py routes ops on CPU tensors here when emulation is on (DEEPKERNELS_EMULATE=1).
#define DEEPKERNELS_EMULATOR 1
#include "../torch_bindings.cpp"

#include "stats.h"

namespace {

PyObject* emulator_stats(PyObject*, PyObject*) {
  const emu::Stats s = emu::stats();
  PyObject* kernels = PyDict_New();
  for (const auto& [name, launches] : s.kernels) {
    PyObject* v = PyLong_FromUnsignedLongLong(launches);
    PyDict_SetItemString(kernels, name.c_str(), v);
    Py_DECREF(v);
  }
  PyObject* out = Py_BuildValue("{s:K,s:K,s:K,s:d,s:N}", "launches", static_cast<unsigned long long>(s.launches),
                                "ctas", static_cast<unsigned long long>(s.ctas), "switches",
                                static_cast<unsigned long long>(s.switches), "seconds", s.seconds, "kernels",
                                kernels);
  return out;
}

PyMethodDef methods[] = {
    {"stats", emulator_stats, METH_NOARGS, "Emulated launches, CTAs, fiber switches, seconds and launches per kernel."},
    DEEPKERNELS_GEMM_PY_METHODS
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" PyMODINIT_FUNC PyInit__emu(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_emu", nullptr, -1, methods};
  return PyModule_Create(&module);
}
