// embfast's ONNX Runtime custom operators: a shared library that ONNX Runtime loads with
// SessionOptions.register_custom_ops_library (embfast/ortops.py).
//
// ai.embfast::RowQuantMatMul (csrc/embfast/rowgemm.hpp): int8 products with one activation scale per
// row, with the row quantization, smoothing, bias, residual and GELU of embfast.rowquant fused in.
//   inputs:  0 X float (..., K); 1 W int8 (K, N), an initializer; 2 col_scale float (N), an initializer;
//            3 bias float (N), optional initializer; 4 smooth float (K), optional initializer;
//            5 residual float (..., N), optional
//   outputs: 0 Y float (..., N); or, with split = 3, Y split into 3 equal parts along the last axis
//            (outputs 0, 1, 2: a QKV projection written straight into Q, K and V, no Split node)
//   attributes: zero_point (int, 128 or 16), levels (float), floor (float), shifted (int 0/1),
//               activation (int: 0 none, 1 GELU), split (int: 1 or 3)
//
// ONNX Runtime's C API is reached through the function table it passes in (OrtApi), by slot: ONNX
// Runtime only ever appends to that table (its ABI promise), so a slot's index is fixed from the
// version that added it on. The slots used, with the API version that has them all (18: ONNX Runtime
// 1.18), are listed in `Api` below. No ONNX Runtime header or library is needed to build this file.
#include <cstdint>
#include <cstring>
#include <exception>
#include <memory>
#include <string>
#include <vector>

#include "embfast/rowgemm.hpp"

namespace {

struct OrtStatus;
struct OrtApi;
struct OrtKernelInfo;
struct OrtKernelContext;
struct OrtValue;
struct OrtTensorTypeAndShapeInfo;
struct OrtSessionOptions;
struct OrtCustomOpDomain;

struct OrtApiBase {
    const OrtApi* (*GetApi)(uint32_t version);
    const char* (*GetVersionString)();
};

constexpr uint32_t kApiVersion = 18;
enum ErrorCode { kFail = 1, kInvalidArgument = 2, kRuntimeException = 6 };
enum ElementType { kUndefined = 0, kFloat = 1, kUInt8 = 2, kInt8 = 3 };
enum Characteristic { kRequired = 0, kOptional = 1 };

// The OrtApi slots used (index = position in ONNX Runtime's function table).
struct Api {
    const void* const* t;
    template <typename F>
    F at(int slot) const { return reinterpret_cast<F>(const_cast<void*>(t[slot])); }

    OrtStatus* CreateStatus(int code, const char* msg) const {
        return at<OrtStatus* (*)(int, const char*)>(0)(code, msg);
    }
    OrtStatus* CreateCustomOpDomain(const char* d, OrtCustomOpDomain** out) const {
        return at<OrtStatus* (*)(const char*, OrtCustomOpDomain**)>(26)(d, out);
    }
    OrtStatus* CustomOpDomain_Add(OrtCustomOpDomain* d, const void* op) const {
        return at<OrtStatus* (*)(OrtCustomOpDomain*, const void*)>(27)(d, op);
    }
    OrtStatus* AddCustomOpDomain(OrtSessionOptions* o, OrtCustomOpDomain* d) const {
        return at<OrtStatus* (*)(OrtSessionOptions*, OrtCustomOpDomain*)>(28)(o, d);
    }
    OrtStatus* GetTensorMutableData(OrtValue* v, void** out) const {
        return at<OrtStatus* (*)(OrtValue*, void**)>(51)(v, out);
    }
    OrtStatus* GetDimensionsCount(const OrtTensorTypeAndShapeInfo* i, size_t* out) const {
        return at<OrtStatus* (*)(const OrtTensorTypeAndShapeInfo*, size_t*)>(61)(i, out);
    }
    OrtStatus* GetDimensions(const OrtTensorTypeAndShapeInfo* i, int64_t* dims, size_t n) const {
        return at<OrtStatus* (*)(const OrtTensorTypeAndShapeInfo*, int64_t*, size_t)>(62)(i, dims, n);
    }
    OrtStatus* GetTensorElementType(const OrtTensorTypeAndShapeInfo* i, int* out) const {
        return at<OrtStatus* (*)(const OrtTensorTypeAndShapeInfo*, int*)>(60)(i, out);
    }
    OrtStatus* GetTensorTypeAndShape(const OrtValue* v, OrtTensorTypeAndShapeInfo** out) const {
        return at<OrtStatus* (*)(const OrtValue*, OrtTensorTypeAndShapeInfo**)>(65)(v, out);
    }
    // KernelInfoGetAttribute_float and _int64, by the value's type.
    OrtStatus* KernelInfoGetAttribute(const OrtKernelInfo* i, const char* name, float* out) const {
        return at<OrtStatus* (*)(const OrtKernelInfo*, const char*, float*)>(85)(i, name, out);
    }
    OrtStatus* KernelInfoGetAttribute(const OrtKernelInfo* i, const char* name, int64_t* out) const {
        return at<OrtStatus* (*)(const OrtKernelInfo*, const char*, int64_t*)>(86)(i, name, out);
    }
    OrtStatus* KernelContext_GetInputCount(const OrtKernelContext* c, size_t* out) const {
        return at<OrtStatus* (*)(const OrtKernelContext*, size_t*)>(88)(c, out);
    }
    OrtStatus* KernelContext_GetInput(const OrtKernelContext* c, size_t i, const OrtValue** out) const {
        return at<OrtStatus* (*)(const OrtKernelContext*, size_t, const OrtValue**)>(90)(c, i, out);
    }
    OrtStatus* KernelContext_GetOutput(OrtKernelContext* c, size_t i, const int64_t* dims, size_t n,
                                       OrtValue** out) const {
        return at<OrtStatus* (*)(OrtKernelContext*, size_t, const int64_t*, size_t, OrtValue**)>(91)(c, i, dims, n, out);
    }
    void ReleaseStatus(OrtStatus* s) const { at<void (*)(OrtStatus*)>(93)(s); }
    void ReleaseTensorTypeAndShapeInfo(OrtTensorTypeAndShapeInfo* i) const {
        at<void (*)(OrtTensorTypeAndShapeInfo*)>(99)(i);
    }
    OrtStatus* KernelInfo_GetInputCount(const OrtKernelInfo* i, size_t* out) const {
        return at<OrtStatus* (*)(const OrtKernelInfo*, size_t*)>(230)(i, out);
    }
    OrtStatus* KernelInfoGetConstantInput_tensor(const OrtKernelInfo* i, size_t index, int* is_constant,
                                                 const OrtValue** out) const {
        return at<OrtStatus* (*)(const OrtKernelInfo*, size_t, int*, const OrtValue**)>(249)(i, index, is_constant, out);
    }
    OrtStatus* KernelContext_ParallelFor(const OrtKernelContext* c, void (*fn)(void*, size_t), size_t total,
                                         size_t num_batch, void* data) const {
        return at<OrtStatus* (*)(const OrtKernelContext*, void (*)(void*, size_t), size_t, size_t, void*)>(274)(
            c, fn, total, num_batch, data);
    }
};

// An error from ONNX Runtime, carried as an exception up to the entry point that returns it.
struct OrtError {
    OrtStatus* status;
};

void check(OrtStatus* s) {
    if (s) throw OrtError{s};
}

struct Tensor {
    std::vector<int64_t> dims;
    int type = kUndefined;
    void* data = nullptr;
    int64_t size() const {
        int64_t n = 1;
        for (auto d : dims) n *= d;
        return n;
    }
};

Tensor describe(const Api& api, const OrtValue* v) {
    Tensor t;
    OrtTensorTypeAndShapeInfo* info = nullptr;
    check(api.GetTensorTypeAndShape(v, &info));
    size_t n = 0;
    OrtStatus* s = api.GetDimensionsCount(info, &n);
    if (!s) {
        t.dims.resize(n);
        s = api.GetDimensions(info, t.dims.data(), n);
    }
    if (!s) s = api.GetTensorElementType(info, &t.type);
    api.ReleaseTensorTypeAndShapeInfo(info);
    check(s);
    check(api.GetTensorMutableData(const_cast<OrtValue*>(v), &t.data));
    return t;
}

std::runtime_error invalid(const std::string& what) { return std::runtime_error("RowQuantMatMul: " + what); }

struct RowQuantKernel {
    Api api;
    embfast::rowgemm::Packed packed;
    embfast::rowgemm::RowQuant rq;
    std::vector<float> smooth;
    int parts = 1;
};

// Reads an initializer input (index) when the node has it; returns false when it is absent.
bool constant_input(const Api& api, const OrtKernelInfo* info, size_t index, Tensor* out) {
    size_t count = 0;
    check(api.KernelInfo_GetInputCount(info, &count));
    if (index >= count) return false;
    int is_constant = 0;
    const OrtValue* v = nullptr;
    check(api.KernelInfoGetConstantInput_tensor(info, index, &is_constant, &v));
    if (!v) return false;  // an optional input left empty
    if (!is_constant) throw invalid("input " + std::to_string(index) + " must be an initializer");
    *out = describe(api, v);
    return true;
}

// The node's attribute `name` (float or int64), or `fallback` when the node does not set it.
template <typename T>
T attr(const Api& api, const OrtKernelInfo* info, const char* name, T fallback) {
    T v = fallback;
    if (OrtStatus* s = api.KernelInfoGetAttribute(info, name, &v)) {
        api.ReleaseStatus(s);
        return fallback;
    }
    return v;
}

RowQuantKernel* create_row_quant(const Api& api, const OrtKernelInfo* info) {
    auto k = std::make_unique<RowQuantKernel>();
    k->api = api;
    Tensor w, scale, bias, smooth;
    if (!constant_input(api, info, 1, &w) || w.type != kInt8 || w.dims.size() != 2)
        throw invalid("W must be a 2-D int8 initializer");
    const int K = static_cast<int>(w.dims[0]), N = static_cast<int>(w.dims[1]);
    if (K <= 0 || N <= 0) throw invalid("W must not be empty");
    if (!constant_input(api, info, 2, &scale) || scale.type != kFloat || scale.size() != N)
        throw invalid("col_scale must be a float initializer of W's column count");
    const bool has_bias = constant_input(api, info, 3, &bias);
    if (has_bias && (bias.type != kFloat || bias.size() != N))
        throw invalid("bias must be a float initializer of W's column count");
    if (constant_input(api, info, 4, &smooth)) {
        if (smooth.type != kFloat || smooth.size() != K) throw invalid("smooth must be a float initializer of W's row count");
        const float* s = static_cast<const float*>(smooth.data);
        k->smooth.assign(s, s + K);
    }
    auto& rq = k->rq;
    rq.zero_point = static_cast<int>(attr<int64_t>(api, info, "zero_point", 128));
    rq.levels = attr(api, info, "levels", 127.0f);
    rq.floor = attr(api, info, "floor", 1e-30f);
    rq.shifted = attr<int64_t>(api, info, "shifted", 0) != 0;
    rq.activation = static_cast<int>(attr<int64_t>(api, info, "activation", 0));
    if (rq.zero_point < 0 || rq.zero_point > 255) throw invalid("zero_point must be in [0, 255]");
    if (!(rq.levels > 0.0f) || rq.levels + rq.zero_point > 255.0f) throw invalid("levels + zero_point must be in (0, 255]");
    if (!(rq.floor > 0.0f)) throw invalid("floor must be > 0");
    if (rq.activation != 0 && rq.activation != 1) throw invalid("activation must be 0 (none) or 1 (GELU)");
    k->parts = static_cast<int>(attr<int64_t>(api, info, "split", 1));
    if (k->parts != 1 && !(k->parts == 3 && N % 3 == 0 && (N / 3) % embfast::rowgemm::kVnniCols == 0))
        throw invalid("split must be 1, or 3 with N / 3 a multiple of " + std::to_string(embfast::rowgemm::kVnniCols));
    rq.smooth = k->smooth.empty() ? nullptr : k->smooth.data();
    k->packed = embfast::rowgemm::pack(static_cast<const int8_t*>(w.data), K, N, static_cast<const float*>(scale.data),
                                       has_bias ? static_cast<const float*>(bias.data) : nullptr,
                                       embfast::rowgemm::chosen_isa());
    return k.release();
}

struct Work {
    const RowQuantKernel* k;
    const float* x;
    const float* residual;
    embfast::rowgemm::Out out;
    int64_t rows;
    int64_t rows_per_task;
};

void run_task(void* data, size_t i) {
    const Work& w = *static_cast<const Work*>(data);
    const int64_t r0 = static_cast<int64_t>(i) * w.rows_per_task;
    const int64_t r1 = std::min(w.rows, r0 + w.rows_per_task);
    const auto& p = w.k->packed;
    embfast::rowgemm::compute_rows(p, w.k->rq, w.x, p.K, w.residual, p.N, w.out, r0, r1);
}

void compute_row_quant(const RowQuantKernel& k, OrtKernelContext* ctx) {
    const Api& api = k.api;
    const OrtValue* xv = nullptr;
    check(api.KernelContext_GetInput(ctx, 0, &xv));
    Tensor x = describe(api, xv);
    const auto& p = k.packed;
    if (x.type != kFloat || x.dims.empty() || x.dims.back() != p.K)
        throw invalid("X must be float with a last dimension of " + std::to_string(p.K));
    std::vector<int64_t> out_dims = x.dims;
    out_dims.back() = p.N / k.parts;
    const int64_t rows = x.size() / p.K;
    size_t inputs = 0;
    check(api.KernelContext_GetInputCount(ctx, &inputs));
    const float* residual = nullptr;
    if (inputs > 5) {
        const OrtValue* rv = nullptr;
        check(api.KernelContext_GetInput(ctx, 5, &rv));
        if (rv) {
            Tensor r = describe(api, rv);
            if (r.type != kFloat || r.dims != out_dims || k.parts != 1)
                throw invalid("residual must be float and shaped as the output (and split 1)");
            residual = static_cast<const float*>(r.data);
        }
    }
    embfast::rowgemm::Out out;
    out.parts = k.parts;
    out.width = p.N / k.parts;
    for (int i = 0; i < k.parts; ++i) {
        OrtValue* yv = nullptr;
        check(api.KernelContext_GetOutput(ctx, i, out_dims.data(), out_dims.size(), &yv));
        if (!yv) throw invalid("split 3 needs its 3 outputs");
        void* y = nullptr;
        check(api.GetTensorMutableData(yv, &y));
        out.y[i] = static_cast<float*>(y);
    }
    if (rows == 0) return;
    const int64_t block = p.isa == embfast::rowgemm::Isa::avx2 ? embfast::rowgemm::kAvx2Rows : embfast::rowgemm::kVnniRows;
    // Tasks of whole row blocks, about 16 per call (at least one block each): enough to balance the pool's
    // threads, few enough that each task's passes over the weights stay amortized.
    const int64_t rows_per_task = std::max<int64_t>(block, (rows / 16 + block - 1) / block * block);
    Work w{&k, static_cast<const float*>(x.data), residual, out, rows, rows_per_task};
    const size_t tasks = static_cast<size_t>((rows + rows_per_task - 1) / rows_per_task);
    if (tasks == 1) {
        run_task(&w, 0);
        return;
    }
    check(api.KernelContext_ParallelFor(ctx, run_task, tasks, 0, &w));
}

// The OrtCustomOp table, filled up to KernelComputeV2 (ONNX Runtime reads fields by `version`).
struct CustomOp {
    uint32_t version;
    void* (*CreateKernel)(const CustomOp*, const OrtApi*, const OrtKernelInfo*);
    const char* (*GetName)(const CustomOp*);
    const char* (*GetExecutionProviderType)(const CustomOp*);
    int (*GetInputType)(const CustomOp*, size_t);
    size_t (*GetInputTypeCount)(const CustomOp*);
    int (*GetOutputType)(const CustomOp*, size_t);
    size_t (*GetOutputTypeCount)(const CustomOp*);
    void (*KernelCompute)(void*, OrtKernelContext*);
    void (*KernelDestroy)(void*);
    int (*GetInputCharacteristic)(const CustomOp*, size_t);
    int (*GetOutputCharacteristic)(const CustomOp*, size_t);
    int (*GetInputMemoryType)(const CustomOp*, size_t);
    int (*GetVariadicInputMinArity)(const CustomOp*);
    int (*GetVariadicInputHomogeneity)(const CustomOp*);
    int (*GetVariadicOutputMinArity)(const CustomOp*);
    int (*GetVariadicOutputHomogeneity)(const CustomOp*);
    OrtStatus* (*CreateKernelV2)(const CustomOp*, const OrtApi*, const OrtKernelInfo*, void**);
    OrtStatus* (*KernelComputeV2)(void*, OrtKernelContext*);
    void* rest[8];  // later fields, unused at this version
};

OrtStatus* status_of(const Api& api, const std::exception& e, int code) { return api.CreateStatus(code, e.what()); }

CustomOp make_row_quant_op() {
    CustomOp op{};
    op.version = 16;  // CreateKernelV2 / KernelComputeV2 (ONNX Runtime >= 1.16)
    op.CreateKernel = [](const CustomOp*, const OrtApi*, const OrtKernelInfo*) -> void* { return nullptr; };
    op.GetName = [](const CustomOp*) { return "RowQuantMatMul"; };
    op.GetExecutionProviderType = [](const CustomOp*) { return "CPUExecutionProvider"; };
    op.GetInputType = [](const CustomOp*, size_t i) { return static_cast<int>(i == 1 ? kInt8 : kFloat); };
    op.GetInputTypeCount = [](const CustomOp*) { return static_cast<size_t>(6); };
    op.GetOutputType = [](const CustomOp*, size_t) { return static_cast<int>(kFloat); };
    op.GetOutputTypeCount = [](const CustomOp*) { return static_cast<size_t>(3); };
    op.KernelCompute = [](void*, OrtKernelContext*) {};
    op.KernelDestroy = [](void* k) { delete static_cast<RowQuantKernel*>(k); };
    op.GetInputCharacteristic = [](const CustomOp*, size_t i) { return static_cast<int>(i < 3 ? kRequired : kOptional); };
    op.GetOutputCharacteristic = [](const CustomOp*, size_t i) { return static_cast<int>(i == 0 ? kRequired : kOptional); };
    op.GetInputMemoryType = [](const CustomOp*, size_t) { return 0; };  // OrtMemTypeDefault
    op.GetVariadicInputMinArity = [](const CustomOp*) { return 1; };
    op.GetVariadicInputHomogeneity = [](const CustomOp*) { return 1; };
    op.GetVariadicOutputMinArity = [](const CustomOp*) { return 1; };
    op.GetVariadicOutputHomogeneity = [](const CustomOp*) { return 1; };
    op.CreateKernelV2 = [](const CustomOp*, const OrtApi* api_table, const OrtKernelInfo* info, void** out) -> OrtStatus* {
        Api api{reinterpret_cast<const void* const*>(api_table)};
        try {
            *out = create_row_quant(api, info);
            return nullptr;
        } catch (const OrtError& e) {
            return e.status;
        } catch (const std::exception& e) {
            return status_of(api, e, kInvalidArgument);
        }
    };
    op.KernelComputeV2 = [](void* kernel, OrtKernelContext* ctx) -> OrtStatus* {
        const auto& k = *static_cast<const RowQuantKernel*>(kernel);
        try {
            compute_row_quant(k, ctx);
            return nullptr;
        } catch (const OrtError& e) {
            return e.status;
        } catch (const std::exception& e) {
            return status_of(k.api, e, kRuntimeException);
        }
    };
    return op;
}

CustomOp g_row_quant_op = make_row_quant_op();

}  // namespace

extern "C" {

// Entry point ONNX Runtime calls when a session registers this library.
__attribute__((visibility("default"))) OrtStatus* RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* base) {
    const OrtApi* table = base->GetApi(kApiVersion);
    if (!table) {
        const OrtApi* first = base->GetApi(1);
        if (!first) return nullptr;
        Api old{reinterpret_cast<const void* const*>(first)};
        std::string msg = std::string("embfast's custom operators need ONNX Runtime >= 1.18, this is ") +
                          base->GetVersionString();
        return old.CreateStatus(kFail, msg.c_str());
    }
    static Api api{reinterpret_cast<const void* const*>(table)};
    OrtCustomOpDomain* domain = nullptr;  // kept for the process's life: sessions refer to it
    if (OrtStatus* s = api.CreateCustomOpDomain("ai.embfast", &domain)) return s;
    if (OrtStatus* s = api.CustomOpDomain_Add(domain, &g_row_quant_op)) return s;
    return api.AddCustomOpDomain(options, domain);
}

// The path the RowQuantMatMul kernels created now take ("avx512vnni", "avx2" or "generic").
__attribute__((visibility("default"))) const char* embfast_rowgemm_isa() {
    return embfast::rowgemm::isa_label(embfast::rowgemm::chosen_isa());
}

}  // extern "C"
