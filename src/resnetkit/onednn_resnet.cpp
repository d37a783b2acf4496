// A post-activation ResNet (BN folded into the convs) run by oneDNN primitives directly, with
// no framework between them: every activation stays in one layout at the network's precision
// (fp32, bf16, or int8: u8 after a ReLU, s8 where signed), each conv has its ReLU and the
// residual sum fused (the sum written in place into the shortcut's buffer), and buffers are
// reused by the slots Python assigns. The head's average pool ends each run (fp32 features);
// the classifier runs in torch. Python (infer/backends/onednn.py) describes the network op by
// op with the add_* calls, then asks for a plan per input shape and runs it. The layout is
// NHWC, or channels in blocks of 8 or 16 (nChw8c, nChw16c: the input NCHW where its channels
// do not fill a block), as Python chooses for the CPU (rk_set_layout). Built on first
// use against the oneDNN of the onednn-cpu-gomp wheel; called through ctypes.
#include <oneapi/dnnl/dnnl.hpp>

#include <omp.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <tuple>
#include <string>
#include <unordered_map>
#include <vector>

using namespace dnnl;
using dt = memory::data_type;
using tag = memory::format_tag;

namespace {

thread_local std::string last_error;

enum Precision { F32 = 0, BF16 = 1, INT8 = 2 };

struct Conv {
  int src, dst, ic, oc, kh, kw, sh, sw, ph, pw, dh, dw, groups;
  std::vector<float> weight;    // fp32 and bf16: the folded weights, (oc, ic/g, kh, kw)
  std::vector<int8_t> qweight;  // int8: the quantized weights, same layout
  std::vector<float> bias, wscale;
  float src_scale, dst_scale, sum_scale;
  int relu, sum, dst_signed;
  // weights reordered for each layout a plan's primitive asked for
  std::vector<std::pair<memory::desc, memory>> packed;
};

struct Pool {
  int src, dst, kh, kw, sh, sw, ph, pw;
  int average, ceil;  // average (padding left out of the count) or max; ceil or floor sizes
};

struct Op {
  int kind;  // 0 conv, 1 pool
  Conv conv;
  Pool pool;
};

struct Buffer {
  void* ptr = nullptr;
  size_t size = 0;
  ~Buffer() { std::free(ptr); }
  bool reserve(size_t bytes) {  // contents are not kept
    if (bytes <= size) return true;
    std::free(ptr);
    ptr = nullptr, size = 0;
    if (posix_memalign(&ptr, 64, bytes)) return false;
    size = bytes;
    return true;
  }
};

struct Net {
  int precision, in_chans = 0, input = -1, output = -1, slots = 0;
  int block = 0;  // the maps' channels in blocks of this many (8, 16), or 0: NHWC
  float in_scale = 1.f;
  bool frozen = false;  // no more ops once a plan points into them
  engine eng{engine::kind::cpu, 0};
  std::vector<Op> ops;
  // the slots' memory and the scratch space, one set shared by every plan (runs are one at
  // a time: the Python side holds a lock), grown to the largest plan run so far
  std::vector<Buffer> shared;
};

struct Shape {
  int c = 0, h = 0, w = 0;
  dt type = dt::undef;
};

struct Plan {
  Net* net;
  int n, h, w;
  Shape out_shape;
  int out_slot = 0, out_block = 0;
  int block = 0;  // the net's layout, or NHWC (0) where a layer has no kernel for it
  stream st;
  std::vector<primitive> prims;
  std::vector<std::unordered_map<int, memory>> args;
  // what each buffer argument points at: (primitive, argument, slot; net.slots is the scratch)
  std::vector<std::tuple<size_t, int, int>> bindings;
  std::vector<size_t> bytes;  // per slot, and the scratch space last
  memory user_in;
};

dt act_type(const Net& net, bool is_signed) {
  if (net.precision == INT8) return is_signed ? dt::s8 : dt::u8;
  return net.precision == BF16 ? dt::bf16 : dt::f32;
}

// a map's memory in the net's layout: NHWC, or its channels in blocks where they fill them
// (the input, whose channels seldom do, NCHW then: the layout oneDNN's first-layer kernels
// read)
memory::desc map_desc(const Plan& p, const Shape& s, bool input = false) {
  memory::dims dims{p.n, s.c, s.h, s.w};
  if (p.block && s.c % p.block == 0)
    return memory::desc(dims, s.type, p.block == 8 ? tag::nChw8c : tag::nChw16c);
  return memory::desc(dims, s.type, p.block && input ? tag::nchw : tag::nhwc);
}

memory scalar(const engine& eng, const float* values, int count) {
  return memory(memory::desc({count}, dt::f32, tag::a), eng, const_cast<float*>(values));
}

int out_size(int in, int k, int s, int pad, int d) { return (in + 2 * pad - d * (k - 1) - 1) / s + 1; }

bool fail(const std::string& what) {
  last_error = what;
  return false;
}

bool build(Plan& p) {
  Net& net = *p.net;
  if (net.output < 0 || net.output >= net.slots || net.input < 0 || net.input >= net.slots || net.ops.empty())
    return fail("the network is incomplete");
  net.frozen = true;
  const engine& eng = net.eng;
  std::vector<Shape> shape(net.slots);
  std::vector<size_t> bytes(net.slots, 0);
  auto grow = [&](int slot, const memory::desc& d) { bytes[slot] = std::max(bytes[slot], d.get_size()); };
  shape[net.input] = {net.in_chans, p.h, p.w, act_type(net, true)};
  grow(net.input, map_desc(p, shape[net.input], true));
  // first pass: the primitives and every slot's largest size; the memories come after. Every
  // primitive's scratch space is one buffer, shared (they run one after another)
  size_t scratch = 0;
  std::vector<std::unordered_map<int, memory::desc>> descs;
  for (Op& op : net.ops) {
    std::unordered_map<int, memory::desc> d;
    if (op.kind == 0) {
      Conv& c = op.conv;
      Shape in = shape[c.src];
      if (in.c != c.ic) return fail("a conv expects " + std::to_string(c.ic) + " channels, has " + std::to_string(in.c));
      int oh = out_size(in.h, c.kh, c.sh, c.ph, c.dh), ow = out_size(in.w, c.kw, c.sw, c.pw, c.dw);
      if (oh < 1 || ow < 1) return fail("the input is too small for this network");
      Shape out{c.oc, oh, ow, act_type(net, c.dst_signed)};
      if (c.sum) {
        const Shape& r = shape[c.dst];
        if (r.c != out.c || r.h != out.h || r.w != out.w)
          return fail("a residual sum's shapes differ (" + std::to_string(r.c) + "x" + std::to_string(r.h) + "x" +
                      std::to_string(r.w) + " and " + std::to_string(out.c) + "x" + std::to_string(oh) + "x" +
                      std::to_string(ow) + ")");
      }
      memory::dims wdims = c.groups > 1 ? memory::dims{c.groups, c.oc / c.groups, c.ic / c.groups, c.kh, c.kw}
                                        : memory::dims{c.oc, c.ic, c.kh, c.kw};
      dt wtype = net.precision == INT8 ? dt::s8 : act_type(net, false);
      memory::desc src = map_desc(p, in, c.src == net.input), dst = map_desc(p, out);
      memory::desc wei(wdims, wtype, tag::any), bia({c.oc}, dt::f32, tag::a);
      primitive_attr attr;
      post_ops po;
      if (c.sum) {
        if (net.precision == INT8) po.append_sum(c.sum_scale, 0, shape[c.dst].type);
        else po.append_sum(1.f);
      }
      if (c.relu) po.append_eltwise(algorithm::eltwise_relu, 0.f, 0.f);
      attr.set_post_ops(po);
      attr.set_scratchpad_mode(scratchpad_mode::user);
      if (net.precision == INT8) {
        attr.set_scales_mask(DNNL_ARG_SRC, 0);
        attr.set_scales_mask(DNNL_ARG_WEIGHTS, c.groups > 1 ? 3 : 1);
        attr.set_scales_mask(DNNL_ARG_DST, 0);
      }
      auto pd = convolution_forward::primitive_desc(eng, prop_kind::forward_inference, algorithm::convolution_direct,
                                                    src, wei, bia, dst, {c.sh, c.sw}, {c.dh - 1, c.dw - 1},
                                                    {c.ph, c.pw}, {c.ph, c.pw}, attr);
      if (std::string(pd.impl_info_str()).rfind("ref", 0) == 0)  // a reference loop: far too slow
        return fail("oneDNN has no optimized " + std::string(net.precision == INT8 ? "int8" : net.precision == BF16 ? "bf16" : "fp32") +
                    " convolution for a " + std::to_string(c.kh) + "x" + std::to_string(c.kw) + " conv of " +
                    std::to_string(c.ic) + " to " + std::to_string(c.oc) + " channels on this CPU");
      scratch = std::max(scratch, pd.scratchpad_desc().get_size());
      p.prims.push_back(convolution_forward(pd));
      memory* packed = nullptr;
      for (auto& [desc, mem] : c.packed)
        if (desc == pd.weights_desc()) packed = &mem;
      if (!packed) {
        memory::desc plain(wdims, wtype, c.groups > 1 ? tag::goihw : tag::oihw);
        void* data = net.precision == INT8 ? static_cast<void*>(c.qweight.data()) : static_cast<void*>(c.weight.data());
        memory from;
        if (net.precision == INT8 || wtype == dt::f32) {
          from = memory(plain, eng, data);
        } else {  // fp32 weights to bf16 in the same reorder
          from = memory(memory::desc(wdims, dt::f32, c.groups > 1 ? tag::goihw : tag::oihw), eng, data);
        }
        memory to(pd.weights_desc(), eng);
        stream s(eng);
        reorder(from, to).execute(s, from, to);
        s.wait();
        c.packed.emplace_back(pd.weights_desc(), to);
        packed = &c.packed.back().second;
      }
      std::unordered_map<int, memory> a;
      a[DNNL_ARG_WEIGHTS] = *packed;
      a[DNNL_ARG_BIAS] = memory(bia, eng, c.bias.data());
      if (net.precision == INT8) {
        a[DNNL_ARG_ATTR_SCALES | DNNL_ARG_SRC] = scalar(eng, &c.src_scale, 1);
        a[DNNL_ARG_ATTR_SCALES | DNNL_ARG_WEIGHTS] = scalar(eng, c.wscale.data(), c.oc);
        a[DNNL_ARG_ATTR_SCALES | DNNL_ARG_DST] = scalar(eng, &c.dst_scale, 1);
      }
      p.args.push_back(std::move(a));
      d[DNNL_ARG_SRC] = src;
      d[DNNL_ARG_DST] = dst;
      shape[c.dst] = out;
      grow(c.dst, dst);
    } else {
      Pool& q = op.pool;
      Shape in = shape[q.src];
      // PyTorch's sizes: floor, or ceil where the last window still starts inside the input
      auto size = [&](int i, int k, int s, int pad) {
        int o = (i + 2 * pad - k + (q.ceil ? s - 1 : 0)) / s + 1;
        if (q.ceil && (o - 1) * s >= i + pad) --o;
        return o;
      };
      int oh = size(in.h, q.kh, q.sh, q.ph), ow = size(in.w, q.kw, q.sw, q.pw);
      if (oh < 1 || ow < 1) return fail("the input is too small for this network");
      Shape out{in.c, oh, ow, in.type};
      // the right/bottom padding that gives that size (negative: rows left out)
      int pr_h = (oh - 1) * q.sh + q.kh - in.h - q.ph, pr_w = (ow - 1) * q.sw + q.kw - in.w - q.pw;
      memory::desc src = map_desc(p, in, q.src == net.input), dst = map_desc(p, out);
      primitive_attr attr;
      attr.set_scratchpad_mode(scratchpad_mode::user);
      auto pd = pooling_forward::primitive_desc(
          eng, prop_kind::forward_inference, q.average ? algorithm::pooling_avg_exclude_padding : algorithm::pooling_max,
          src, dst, {q.sh, q.sw}, {q.kh, q.kw}, {0, 0}, {q.ph, q.pw}, {pr_h, pr_w}, attr);
      scratch = std::max(scratch, pd.scratchpad_desc().get_size());
      if (std::string(pd.impl_info_str()).rfind("ref", 0) == 0)
        return fail("oneDNN has no optimized pooling for this layer on this CPU");
      p.prims.push_back(pooling_forward(pd));
      p.args.emplace_back();
      d[DNNL_ARG_SRC] = src;
      d[DNNL_ARG_DST] = dst;
      shape[q.dst] = out;
      grow(q.dst, dst);
    }
    descs.push_back(std::move(d));
  }
  // the output: the last map, averaged by rk_run's own loop (oneDNN's pooling keeps the
  // data type, and its reduction primitive has only a reference implementation: 20 ms a
  // batch for ResNet-50)
  const Shape& last = shape[net.output];
  p.out_shape = last;
  p.out_slot = net.output;
  p.out_block = p.block && last.c % p.block == 0 ? p.block : 0;
  // the input: fp32 NCHW to the first slot's type (int8: quantized by the input's scale)
  memory::desc user_in({p.n, net.in_chans, p.h, p.w}, dt::f32, tag::nchw);
  memory::desc first = map_desc(p, Shape{net.in_chans, p.h, p.w, act_type(net, true)}, true);
  primitive_attr iattr;
  iattr.set_scratchpad_mode(scratchpad_mode::user);
  if (net.precision == INT8) iattr.set_scales_mask(DNNL_ARG_DST, 0);
  auto ipd = reorder::primitive_desc(eng, user_in, eng, first, iattr);
  scratch = std::max(scratch, ipd.scratchpad_desc().get_size());
  // every primitive's arguments, bound to the shared buffers at each run
  auto on_slot = [&](size_t prim, int arg, int slot, const memory::desc& d) {
    p.bindings.emplace_back(prim, arg, slot);
    return memory(d, eng, DNNL_MEMORY_NONE);
  };
  for (size_t i = 0; i < net.ops.size(); ++i) {
    const Op& op = net.ops[i];
    int src = op.kind == 0 ? op.conv.src : op.pool.src, dst = op.kind == 0 ? op.conv.dst : op.pool.dst;
    p.args[i][DNNL_ARG_SRC] = on_slot(i + 1, DNNL_ARG_SRC, src, descs[i][DNNL_ARG_SRC]);
    p.args[i][DNNL_ARG_DST] = on_slot(i + 1, DNNL_ARG_DST, dst, descs[i][DNNL_ARG_DST]);
  }
  p.user_in = memory(user_in, eng, DNNL_MEMORY_NONE);
  std::unordered_map<int, memory> in_args{{DNNL_ARG_FROM, p.user_in},
                                          {DNNL_ARG_TO, on_slot(0, DNNL_ARG_TO, net.input, first)}};
  if (net.precision == INT8) in_args[DNNL_ARG_ATTR_SCALES | DNNL_ARG_DST] = scalar(eng, &net.in_scale, 1);
  p.prims.insert(p.prims.begin(), reorder(ipd));
  p.args.insert(p.args.begin(), std::move(in_args));
  if (scratch) {
    memory::desc pad({static_cast<memory::dim>(scratch)}, dt::u8, tag::a);
    for (size_t i = 0; i < p.args.size(); ++i) p.args[i][DNNL_ARG_SCRATCHPAD] = on_slot(i, DNNL_ARG_SCRATCHPAD, net.slots, pad);
  }
  bytes.push_back(scratch);
  p.bytes = std::move(bytes);
  p.st = stream(eng);
  return true;
}

}  // namespace

extern "C" {

const char* rk_error() { return last_error.c_str(); }

// oneDNN's verbose mode of this library (2: every primitive's execution and its time, on
// stdout), as torch.backends.mkldnn.verbose sets it for PyTorch's own copy
int rk_set_verbose(int level) { return dnnl_set_verbose(level) == dnnl_success ? 0 : -1; }

void* rk_net_new(int precision, int in_chans, int input_slot, float in_scale) {
  try {
    auto* net = new Net;
    net->precision = precision;
    net->in_chans = in_chans;
    net->input = input_slot;
    net->in_scale = in_scale;
    net->slots = input_slot + 1;
    return net;
  } catch (const std::exception& e) {
    last_error = e.what();
    return nullptr;
  }
}

void rk_net_free(void* net) { delete static_cast<Net*>(net); }

}  // extern "C"

namespace {

// appends an op, its slots counted; -1 with rk_error() set where that fails
template <typename Fill>
int add_op(void* handle, int src, int dst, Fill fill) {
  try {
    Net& net = *static_cast<Net*>(handle);
    if (net.frozen) throw std::runtime_error("the network already has plans: build another");
    Op op{};
    fill(net, op);
    net.slots = std::max({net.slots, src + 1, dst + 1});
    net.ops.push_back(std::move(op));
    return 0;
  } catch (const std::exception& e) {
    last_error = e.what();
    return -1;
  }
}

}  // namespace

extern "C" {

// one conv; weight: (oc, ic/groups, kh, kw) fp32 (fp32, bf16) or int8 (int8, with
// wscale per output channel); sum: dst already holds the residual (scale sum_scale)
int rk_add_conv(void* handle, int src, int dst, const int* geometry, const float* weight, const int8_t* qweight,
                const float* bias, const float* wscale, float src_scale, float dst_scale, float sum_scale, int relu,
                int sum, int dst_signed) {
  return add_op(handle, src, dst, [&](Net& net, Op& op) {
    Conv& c = op.conv;
    c.src = src, c.dst = dst;
    c.ic = geometry[0], c.oc = geometry[1], c.kh = geometry[2], c.kw = geometry[3], c.sh = geometry[4];
    c.sw = geometry[5], c.ph = geometry[6], c.pw = geometry[7], c.dh = geometry[8], c.dw = geometry[9];
    c.groups = geometry[10];
    size_t n = static_cast<size_t>(c.oc) * (c.ic / c.groups) * c.kh * c.kw;
    if (net.precision == INT8) c.qweight.assign(qweight, qweight + n);
    else c.weight.assign(weight, weight + n);
    c.bias.assign(bias, bias + c.oc);
    if (net.precision == INT8) c.wscale.assign(wscale, wscale + c.oc);
    c.src_scale = src_scale, c.dst_scale = dst_scale, c.sum_scale = sum_scale;
    c.relu = relu, c.sum = sum, c.dst_signed = dst_signed;
  });
}

// a max pool (average = 0) or an average pool leaving padding out of the count; ceil: the
// output size rounds up (PyTorch's ceil_mode)
int rk_add_pool(void* handle, int src, int dst, int kh, int kw, int sh, int sw, int ph, int pw, int average,
                int ceil) {
  return add_op(handle, src, dst, [&](Net&, Op& op) {
    op.kind = 1;
    op.pool = Pool{src, dst, kh, kw, sh, sw, ph, pw, average, ceil};
  });
}

void rk_set_output(void* handle, int slot) {
  Net& net = *static_cast<Net*>(handle);
  net.output = slot;
}

// the maps' layout: block 0 NHWC, 8 or 16 channels in blocks (fp32 and bf16: oneDNN has no
// blocked int8 kernels for a first layer); -1 with rk_error() set where it cannot be
int rk_set_layout(void* handle, int block) {
  Net& net = *static_cast<Net*>(handle);
  if (net.frozen) {
    fail("the network already has plans: build another");
    return -1;
  }
  if (block != 0 && block != 8 && block != 16) {
    fail("a layout's block is 0, 8 or 16 channels");
    return -1;
  }
  if (block && net.precision == INT8) {
    fail("int8 runs NHWC only");
    return -1;
  }
  net.block = block;
  return 0;
}

// a plan for inputs of (n, in_chans, h, w) on `threads` OpenMP threads; null with rk_error() set where oneDNN has no
// implementation or the shapes do not fit
void* rk_plan(void* handle, int n, int h, int w, int threads) {
  // oneDNN's kernels take their thread count when they are created
  if (threads > 0) omp_set_num_threads(threads);
  auto attempt = [&](int block) -> Plan* {
    auto* p = new Plan;
    p->net = static_cast<Net*>(handle);
    p->n = n, p->h = h, p->w = w, p->block = block;
    try {
      if (build(*p)) return p;
    } catch (const dnnl::error& e) {
      last_error = std::string("oneDNN: ") + e.what();
    } catch (const std::exception& e) {
      last_error = e.what();
    }
    delete p;
    return nullptr;
  };
  const int block = static_cast<Net*>(handle)->block;
  Plan* p = attempt(block);
  // a layer with no kernel for the blocked layout (a few channels, mixed with blocked maps):
  // the whole plan NHWC
  if (!p && block) p = attempt(0);
  return p;
}

// the activations' layout a plan runs: the channels' block size, 0 for NHWC
int rk_plan_block(void* plan) { return static_cast<Plan*>(plan)->block; }

// the bytes of a plan's largest activation map (every image of the batch)
int64_t rk_plan_map_bytes(void* plan) {
  const Plan& p = *static_cast<Plan*>(plan);
  size_t most = 0;
  for (size_t i = 0; i + 1 < p.bytes.size(); ++i) most = std::max(most, p.bytes[i]);  // the last: scratch
  return static_cast<int64_t>(most);
}

// the number of features a plan's run gives per image (the last map's channels)
int rk_plan_features(void* plan) { return static_cast<Plan*>(plan)->out_shape.c; }

void rk_plan_free(void* plan) { delete static_cast<Plan*>(plan); }

// runs the plan on `threads` OpenMP threads: input fp32 NCHW (n, in_chans, h, w); features
// fp32 (n, C): the last map averaged over H and W, times `scale` (int8: its quantization
// scale)
int rk_run(void* handle, const float* input, float* features, float scale, int threads) {
  Plan& p = *static_cast<Plan*>(handle);
  try {
    if (threads > 0) omp_set_num_threads(threads);
    Net& net = *p.net;
    net.shared.resize(p.bytes.size());
    for (size_t i = 0; i < p.bytes.size(); ++i)
      if (!net.shared[i].reserve(p.bytes[i])) throw std::runtime_error("out of memory");
    for (auto& [prim, arg, slot] : p.bindings) p.args[prim][arg].set_data_handle(net.shared[slot].ptr);
    p.user_in.set_data_handle(const_cast<float*>(input));
    for (size_t i = 0; i < p.prims.size(); ++i) p.prims[i].execute(p.st, p.args[i]);
    p.st.wait();
    const Shape& s = p.out_shape;
    const void* out = net.shared[p.out_slot].ptr;
    const int hw = s.h * s.w, c = s.c, b = p.out_block ? p.out_block : c;
    const float k = scale / hw;
#pragma omp parallel for
    for (int n = 0; n < p.n; ++n) {
      std::vector<float> acc(c, 0.f);
      for (int i = 0; i < hw; ++i) {
        // NHWC: one run of c channels per pixel; blocked: c / b runs of b, a plane apart
        for (int cb = 0; cb < c / b; ++cb) {
          size_t at = ((static_cast<size_t>(n) * (c / b) + cb) * hw + i) * b;
          float* a = acc.data() + static_cast<size_t>(cb) * b;
          switch (s.type) {
            case dt::u8: { auto* x = static_cast<const uint8_t*>(out) + at; for (int j = 0; j < b; ++j) a[j] += x[j]; break; }
            case dt::s8: { auto* x = static_cast<const int8_t*>(out) + at; for (int j = 0; j < b; ++j) a[j] += x[j]; break; }
            case dt::bf16: {
              auto* x = static_cast<const uint16_t*>(out) + at;
              for (int j = 0; j < b; ++j) { uint32_t bits = static_cast<uint32_t>(x[j]) << 16; float f; std::memcpy(&f, &bits, 4); a[j] += f; }
              break;
            }
            default: { auto* x = static_cast<const float*>(out) + at; for (int j = 0; j < b; ++j) a[j] += x[j]; }
          }
        }
      }
      for (int j = 0; j < c; ++j) features[static_cast<size_t>(n) * c + j] = acc[j] * k;
    }
    return 0;
  } catch (const std::exception& e) {
    last_error = e.what();
    return -1;
  }
}

}  // extern "C"
