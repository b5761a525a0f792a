// ONNX Runtime on the CPU through its C API (the C++ wrapper header that ships with it, onnxruntime_cxx_api.h),
// built where CMake is pointed at an ONNX Runtime C package (-Donnxruntime_ROOT=<dir with include/ and lib/>; the
// release archives onnxruntime-linux-x64-<version>.tgz have that layout). As the Python runtime's
// OnnxRuntimeBackend (runtime/backends.py): all graph optimizations, the given intra-op threads, one inter-op
// thread. One session serves every thread: Ort::Session::Run may be called concurrently.
#include <onnxruntime_cxx_api.h>

#include "backend.hpp"

namespace fewstep {
namespace {

class OnnxRuntimeBackend : public Backend {
public:
    OnnxRuntimeBackend(const std::string& path, int32_t threads, const std::vector<std::string>& inputs)
        : env_(ORT_LOGGING_LEVEL_WARNING, "fewstep"), inputs_(inputs),
          memory_(Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault)) {
        Ort::SessionOptions options;
        options.SetGraphOptimizationLevel(GraphOptimizationLevel::ORT_ENABLE_ALL);
        if (threads > 0) options.SetIntraOpNumThreads(threads);
        options.SetInterOpNumThreads(1);
        try {
            session_ = std::make_unique<Ort::Session>(env_, path.c_str(), options);
        } catch (const Ort::Exception& e) {
            throw Error(4, "ONNX Runtime cannot load " + path + ": " + e.what());
        }
        for (const std::string& name : inputs_) names_.push_back(name.c_str());
    }

    const char* name() const override { return "onnxruntime-cpu"; }

    void run(const Feed& feed, float* prediction) override {
        const int64_t n = feed.batch;
        std::vector<int64_t> x_shape{n};
        int64_t x_size = n;
        for (int64_t d : feed.x_shape) {
            x_shape.push_back(d);
            x_size *= d;
        }
        const int64_t vec[1] = {n};
        std::vector<Ort::Value> values;
        for (const std::string& name : inputs_) {  // the caller's memory, wrapped (ONNX Runtime does not write it)
            if (name == "x")
                values.push_back(tensor(const_cast<float*>(feed.x), x_size, x_shape.data(), x_shape.size()));
            else if (name == "sigma")
                values.push_back(tensor(const_cast<float*>(feed.sigma), n, vec, 1));
            else if (name == "timestep")
                values.push_back(tensor(const_cast<float*>(feed.timestep), n, vec, 1));
            else if (name == "class_labels")
                values.push_back(tensor(const_cast<int64_t*>(feed.class_labels), n, vec, 1));
            else if (name == "nfe")
                values.push_back(tensor(const_cast<int64_t*>(feed.nfe), n, vec, 1));
            else
                throw Error(5, "the network has an input '" + name + "' this build does not feed");
        }
        const char* output = "prediction";
        try {
            std::vector<Ort::Value> out = session_->Run(Ort::RunOptions{nullptr}, names_.data(), values.data(),
                                                        values.size(), &output, 1);
            const size_t count = out[0].GetTensorTypeAndShapeInfo().GetElementCount();
            if (count != static_cast<size_t>(x_size)) throw Error(3, "ONNX Runtime returned an unexpected shape");
            const float* data = out[0].GetTensorData<float>();
            std::copy(data, data + count, prediction);
        } catch (const Ort::Exception& e) {
            throw Error(3, std::string("ONNX Runtime failed: ") + e.what());
        }
    }

private:
    template <typename T>
    Ort::Value tensor(T* data, int64_t count, const int64_t* shape, size_t rank) {
        return Ort::Value::CreateTensor<T>(memory_, data, static_cast<size_t>(count), shape, rank);
    }

    Ort::Env env_;
    std::vector<std::string> inputs_;
    std::vector<const char*> names_;
    Ort::MemoryInfo memory_;
    std::unique_ptr<Ort::Session> session_;
};

}  // namespace

std::unique_ptr<Backend> open_onnxruntime(const std::string& onnx_path, int32_t threads,
                                          const std::vector<std::string>& inputs) {
    return std::make_unique<OnnxRuntimeBackend>(onnx_path, threads, inputs);
}

}  // namespace fewstep
