// The network behind the loop: one call on a batch, named inputs in, the prediction out. One backend per engine
// file; fewstep.cpp holds the loop around it (the same for every backend).
#pragma once

#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace fewstep {

// Bad input or a folder the library cannot serve: its message is the one line the caller sees.
struct Error : std::runtime_error {
    int status;
    Error(int status, const std::string& message) : std::runtime_error(message), status(status) {}
};

// One network call's inputs, batch first (the graph's own names: x, sigma, timestep, class_labels, nfe).
struct Feed {
    int64_t batch = 0;
    std::vector<int64_t> x_shape;  // (C, H, W)
    const float* x = nullptr;      // (batch, C, H, W)
    const float* sigma = nullptr;  // (batch,)
    const float* timestep = nullptr;
    const int64_t* class_labels = nullptr;  // (batch,) or null
    const int64_t* nfe = nullptr;           // (batch,) or null
};

class Backend {
public:
    virtual ~Backend() = default;
    virtual const char* name() const = 0;
    // prediction: batch * C * H * W floats. Thread-safe.
    virtual void run(const Feed& feed, float* prediction) = 0;
    // The largest batch one call takes (TensorRT plans have a profile), 0 for any.
    virtual int64_t max_batch() const { return 0; }
};

std::unique_ptr<Backend> open_openvino(const std::string& onnx_path, const std::string& inference_precision,
                                       int32_t threads, const std::vector<std::string>& inputs);
#ifdef FEWSTEP_WITH_ONNXRUNTIME
std::unique_ptr<Backend> open_onnxruntime(const std::string& onnx_path, int32_t threads,
                                          const std::vector<std::string>& inputs);
#endif
#ifdef FEWSTEP_WITH_TENSORRT
std::unique_ptr<Backend> open_tensorrt(const std::string& plan_path, const std::vector<std::string>& inputs);
#endif

}  // namespace fewstep
