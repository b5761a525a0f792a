// OpenVINO on the CPU (its C++ API; the `openvino` PyPI wheel ships the headers, libraries and CMake config).
// As the Python runtime's OpenVinoBackend (runtime/openvino.py), so both compute the same floats: the ONNX file is
// read once, reshaped to each batch size it sees and compiled once per size (a dynamic batch ran two to three times
// slower), with the inference precision always explicit (OpenVINO's own default on bf16 CPUs is bf16) and the
// LATENCY hint; infer requests are pooled per compiled model, so threads never share one.
#include <map>
#include <mutex>

#include <openvino/openvino.hpp>

#include "backend.hpp"

namespace fewstep {
namespace {

constexpr size_t kMaxCompiled = 8;  // compiled batch sizes kept (each holds the weights in OpenVINO's layout)

class OpenVinoBackend : public Backend {
public:
    OpenVinoBackend(const std::string& path, const std::string& precision, int32_t threads,
                    const std::vector<std::string>& inputs)
        : inputs_(inputs) {
        if (precision != "f32" && precision != "bf16")
            throw Error(1, "OpenVINO inference precision must be f32 or bf16, not " + precision);
        if (precision == "bf16") {
            auto caps = core_.get_property("CPU", ov::device::capabilities);
            if (std::find(caps.begin(), caps.end(), "BF16") == caps.end())
                throw Error(5, "this CPU has no bf16 instructions (avx512_bf16 or AMX); use precision fp32 or int8");
        }
        model_ = core_.read_model(path);
        config_ = {ov::hint::inference_precision(precision == "bf16" ? ov::element::bf16 : ov::element::f32),
                   ov::hint::performance_mode(ov::hint::PerformanceMode::LATENCY)};
        if (threads > 0) config_.emplace(ov::inference_num_threads(threads));
        for (const auto& port : model_->inputs()) shapes_[port.get_any_name()] = port.get_partial_shape();
    }

    const char* name() const override { return "openvino-cpu"; }

    void run(const Feed& feed, float* prediction) override {
        Slot& slot = slot_for(feed.batch);
        ov::InferRequest request = take(slot);
        try {
            // Copy into the request's own input tensors: wrapping the caller's memory with set_tensor on every
            // call made OpenVINO re-check the tensors each time (measurable at batch 1); the inputs are small.
            const size_t n = static_cast<size_t>(feed.batch);
            size_t x_size = n;
            for (int64_t d : feed.x_shape) x_size *= static_cast<size_t>(d);
            for (const std::string& name : inputs_) {
                if (name == "x") fill(request, name, feed.x, x_size);
                else if (name == "sigma") fill(request, name, feed.sigma, n);
                else if (name == "timestep") fill(request, name, feed.timestep, n);
                else if (name == "class_labels") fill(request, name, feed.class_labels, n);
                else if (name == "nfe") fill(request, name, feed.nfe, n);
            }
            request.infer();
            const ov::Tensor out = request.get_output_tensor(0);
            const float* data = out.data<const float>();
            std::copy(data, data + out.get_size(), prediction);
        } catch (...) {
            give_back(slot, std::move(request));
            throw;
        }
        give_back(slot, std::move(request));
    }

private:
    template <typename T>
    static void fill(ov::InferRequest& request, const std::string& name, const T* data, size_t count) {
        ov::Tensor tensor = request.get_tensor(name);
        if (tensor.get_size() != count) throw Error(3, "OpenVINO input " + name + " has an unexpected size");
        std::copy(data, data + count, tensor.data<T>());
    }

    struct Slot {
        ov::CompiledModel compiled;
        std::vector<ov::InferRequest> idle;
    };

    Slot& slot_for(int64_t batch) {
        std::lock_guard<std::mutex> lock(mutex_);
        auto it = slots_.find(batch);
        if (it != slots_.end()) return *it->second;
        if (slots_.size() >= kMaxCompiled) {  // the oldest size goes (requests in flight keep their own handle)
            retired_.push_back(std::move(slots_.begin()->second));
            slots_.erase(slots_.begin());
        }
        std::shared_ptr<ov::Model> sized = model_->clone();
        std::map<std::string, ov::PartialShape> reshaped;
        for (const auto& [name, shape] : shapes_) {
            ov::PartialShape s = shape;
            s[0] = batch;
            reshaped[name] = s;
        }
        sized->reshape(reshaped);
        auto slot = std::make_unique<Slot>();
        slot->compiled = core_.compile_model(sized, "CPU", config_);
        Slot& ref = *slot;
        slots_[batch] = std::move(slot);
        return ref;
    }

    ov::InferRequest take(Slot& slot) {
        {
            std::lock_guard<std::mutex> lock(mutex_);
            if (!slot.idle.empty()) {
                ov::InferRequest r = std::move(slot.idle.back());
                slot.idle.pop_back();
                return r;
            }
        }
        return slot.compiled.create_infer_request();
    }

    void give_back(Slot& slot, ov::InferRequest request) {
        std::lock_guard<std::mutex> lock(mutex_);
        slot.idle.push_back(std::move(request));
    }

    ov::Core core_;
    std::shared_ptr<ov::Model> model_;
    ov::AnyMap config_;
    std::map<std::string, ov::PartialShape> shapes_;
    std::vector<std::string> inputs_;
    std::mutex mutex_;
    std::map<int64_t, std::unique_ptr<Slot>> slots_;
    std::vector<std::unique_ptr<Slot>> retired_;  // evicted sizes: a thread may still hold a request of one
};

}  // namespace

std::unique_ptr<Backend> open_openvino(const std::string& onnx_path, const std::string& inference_precision,
                                       int32_t threads, const std::vector<std::string>& inputs) {
    return std::make_unique<OpenVinoBackend>(onnx_path, inference_precision, threads, inputs);
}

}  // namespace fewstep
