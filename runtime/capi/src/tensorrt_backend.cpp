// TensorRT (its 10/11 C++ API): a plan built by `python -m export.trt`, run as the Python runtime's TensorRT
// backend runs it (runtime/tensorrt.py): deserialize the plan once; per call setInputShape for each input, copy the
// inputs into the slot's device buffers, setTensorAddress, enqueueV3 on the slot's own stream, copy the prediction
// back, synchronise. An execution context is not thread-safe, so calls take a (context, stream, buffers) slot from
// a pool and give it back. Built only where CMake finds TensorRT and CUDA (CMakeLists.txt); the development machine
// of this project has neither, so this file is compiled and run only on users' GPU machines.
#include <NvInfer.h>
#include <cuda_runtime_api.h>

#include <condition_variable>
#include <fstream>
#include <iterator>
#include <map>
#include <mutex>

#include "backend.hpp"

namespace fewstep {
namespace {

constexpr int kSlots = 2;  // calls in flight on the GPU at once; more threads wait for a slot

class Logger : public nvinfer1::ILogger {
public:
    void log(Severity severity, const char* message) noexcept override {
        if (severity <= Severity::kERROR) last = message;
    }
    std::string last;
};

void check(cudaError_t status, const char* what) {
    if (status != cudaSuccess) throw Error(3, std::string(what) + ": " + cudaGetErrorString(status));
}

size_t element_size(nvinfer1::DataType type) {
    switch (type) {
        case nvinfer1::DataType::kINT64: return 8;
        case nvinfer1::DataType::kFLOAT:
        case nvinfer1::DataType::kINT32: return 4;
        case nvinfer1::DataType::kHALF:
        case nvinfer1::DataType::kBF16: return 2;
        default: return 1;
    }
}

class TensorRTBackend : public Backend {
public:
    TensorRTBackend(const std::string& path, const std::vector<std::string>& inputs) : inputs_(inputs) {
        std::ifstream in(path, std::ios::binary);
        if (!in) throw Error(4, "cannot read the TensorRT plan " + path);
        const std::vector<char> plan((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
        runtime_.reset(nvinfer1::createInferRuntime(logger_));
        if (runtime_) engine_.reset(runtime_->deserializeCudaEngine(plan.data(), plan.size()));
        if (!engine_)
            throw Error(4, path + " is not a plan this TensorRT can load (" + logger_.last + "); plans are tied to the "
                           "TensorRT version and GPU that built them: rebuild it with python -m export.trt");
        max_batch_ = engine_->getProfileShape("x", 0, nvinfer1::OptProfileSelector::kMAX).d[0];
        for (int i = 0; i < kSlots; ++i) {
            auto slot = std::make_unique<Slot>();
            slot->context.reset(engine_->createExecutionContext());
            if (!slot->context) throw Error(3, "TensorRT could not create an execution context: " + logger_.last);
            check(cudaStreamCreateWithFlags(&slot->stream, cudaStreamNonBlocking), "cudaStreamCreate");
            idle_.push_back(slot.get());
            slots_.push_back(std::move(slot));
        }
    }

    ~TensorRTBackend() override {
        for (auto& slot : slots_) {
            for (auto& [name, buffer] : slot->device) cudaFree(buffer.first);
            cudaStreamDestroy(slot->stream);
        }
    }

    const char* name() const override { return "tensorrt"; }
    int64_t max_batch() const override { return max_batch_; }

    void run(const Feed& feed, float* prediction) override {
        Slot* slot = take();
        try {
            run_on(*slot, feed, prediction);
        } catch (...) {
            give_back(slot);
            throw;
        }
        give_back(slot);
    }

private:
    struct Slot {
        std::unique_ptr<nvinfer1::IExecutionContext> context;
        cudaStream_t stream = nullptr;
        std::map<std::string, std::pair<void*, size_t>> device;  // name -> (buffer, bytes); buffers only grow
    };

    void* buffer(Slot& slot, const std::string& name, size_t bytes) {
        auto& [ptr, size] = slot.device[name];
        if (size < bytes) {
            if (ptr) check(cudaFree(ptr), "cudaFree");
            ptr = nullptr;
            check(cudaMalloc(&ptr, bytes), "cudaMalloc");
            size = bytes;
        }
        return ptr;
    }

    void run_on(Slot& slot, const Feed& feed, float* prediction) {
        const int64_t n = feed.batch;
        int64_t x_size = n;
        for (int64_t d : feed.x_shape) x_size *= d;
        for (const std::string& name : inputs_) {
            const void* host = name == "x" ? static_cast<const void*>(feed.x)
                               : name == "sigma" ? static_cast<const void*>(feed.sigma)
                               : name == "timestep" ? static_cast<const void*>(feed.timestep)
                               : name == "class_labels" ? static_cast<const void*>(feed.class_labels)
                                                        : static_cast<const void*>(feed.nfe);
            const nvinfer1::DataType type = engine_->getTensorDataType(name.c_str());
            nvinfer1::Dims dims;
            dims.nbDims = name == "x" ? 1 + static_cast<int>(feed.x_shape.size()) : 1;
            dims.d[0] = n;
            for (size_t k = 0; name == "x" && k < feed.x_shape.size(); ++k) dims.d[k + 1] = feed.x_shape[k];
            const size_t count = static_cast<size_t>(name == "x" ? x_size : n);
            // the engine's own type: float32 inputs stay float32 (fp16 plans convert inside), ids int64 or int32
            std::vector<int32_t> narrowed;
            if (type == nvinfer1::DataType::kINT32 && (name == "class_labels" || name == "nfe")) {
                const int64_t* ids = static_cast<const int64_t*>(host);
                narrowed.assign(ids, ids + count);
                host = narrowed.data();
            }
            const size_t bytes = count * element_size(type);
            void* device = buffer(slot, name, bytes);
            check(cudaMemcpyAsync(device, host, bytes, cudaMemcpyHostToDevice, slot.stream), "cudaMemcpyAsync");
            if (!slot.context->setInputShape(name.c_str(), dims) || !slot.context->setTensorAddress(name.c_str(), device))
                throw Error(1, "TensorRT refused input " + name + " at batch " + std::to_string(n) + " (" +
                               logger_.last + "); the plan's batch profile allows 1.." + std::to_string(max_batch_));
        }
        const size_t out_bytes = static_cast<size_t>(x_size) * sizeof(float);
        void* out = buffer(slot, "prediction", out_bytes);
        slot.context->setTensorAddress("prediction", out);
        if (!slot.context->enqueueV3(slot.stream)) throw Error(3, "TensorRT enqueueV3 failed: " + logger_.last);
        check(cudaMemcpyAsync(prediction, out, out_bytes, cudaMemcpyDeviceToHost, slot.stream), "cudaMemcpyAsync");
        check(cudaStreamSynchronize(slot.stream), "cudaStreamSynchronize");
    }

    Slot* take() {
        std::unique_lock<std::mutex> lock(mutex_);
        free_.wait(lock, [this] { return !idle_.empty(); });
        Slot* slot = idle_.back();
        idle_.pop_back();
        return slot;
    }

    void give_back(Slot* slot) {
        {
            std::lock_guard<std::mutex> lock(mutex_);
            idle_.push_back(slot);
        }
        free_.notify_one();
    }

    Logger logger_;
    std::unique_ptr<nvinfer1::IRuntime> runtime_;
    std::unique_ptr<nvinfer1::ICudaEngine> engine_;
    std::vector<std::string> inputs_;
    int64_t max_batch_ = 0;
    std::vector<std::unique_ptr<Slot>> slots_;
    std::vector<Slot*> idle_;
    std::mutex mutex_;
    std::condition_variable free_;
};

}  // namespace

std::unique_ptr<Backend> open_tensorrt(const std::string& plan_path, const std::vector<std::string>& inputs) {
    return std::make_unique<TensorRTBackend>(plan_path, inputs);
}

}  // namespace fewstep
