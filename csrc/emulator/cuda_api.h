#pragma once
// The CUDA runtime calls the launch code makes, answered by the emulated device. Macros, not definitions of
// the real symbols: the process may also have the real libcudart loaded (torch's), which must stay untouched.
#include <cuda_runtime.h>

namespace emu::api {

cudaError_t get_device(int* device);
cudaError_t get_last_error();
cudaError_t device_get_attribute(int* value, cudaDeviceAttr attr, int device);
cudaError_t func_set_attribute(const void* kernel, cudaFuncAttribute attr, int value);
cudaError_t func_get_attributes(cudaFuncAttributes* attr, const void* kernel);
cudaError_t get_driver_entry_point_by_version(const char* symbol, void** fn, unsigned int version,
                                              unsigned long long flags, cudaDriverEntryPointQueryResult* status);
int max_dynamic_smem(const void* kernel);   // what func_set_attribute allowed (48 KiB by default)

template <typename... A>
cudaError_t func_set_attribute(void (*kernel)(A...), cudaFuncAttribute attr, int value) {
  return func_set_attribute(reinterpret_cast<const void*>(kernel), attr, value);
}
template <typename... A>
cudaError_t func_get_attributes(cudaFuncAttributes* attr, void (*kernel)(A...)) {
  return func_get_attributes(attr, reinterpret_cast<const void*>(kernel));
}

}  // namespace emu::api

#define cudaGetDevice ::emu::api::get_device
#define cudaGetLastError ::emu::api::get_last_error
#define cudaDeviceGetAttribute ::emu::api::device_get_attribute
#define cudaFuncSetAttribute ::emu::api::func_set_attribute
#define cudaFuncGetAttributes ::emu::api::func_get_attributes
#define cudaGetDriverEntryPointByVersion ::emu::api::get_driver_entry_point_by_version
