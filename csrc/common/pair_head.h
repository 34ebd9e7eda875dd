// The per-pair head of the loss (docs/spec.md §2-§6) as named steps over one pair j, shared by
// the kernels of every device: errors -> l -> metric u -> weight W, margin Gamma -> per-pair loss
// and its derivative a_j -> reduction; and batch_head, the whole batch's head from those steps,
// which the CPU runs on one thread and CUDA on one block. Plain inline functions of the
// accumulation type Acc (float or double), no ATen, FASTPREF_HOST_DEVICE so that a CUDA kernel
// can include them.
//
// The steps take the names of the Triton head's (pair_head_kernel's steps, in
// fastpref/loss/triton/pair_head.py) and of the eager reference's (fastpref/loss/reference.py).
// Each keeps the association order of its Triton namesake, NaN-preserving min/max/relu and
// stable sigmoid/softplus, so that the backends round alike.
// Every unit that includes this header must compile it with FMA contraction off (cpu/ops.cpp:
// fp-contract=off; nvcc: --fmad=false), or the compiler may fuse a multiply and an add into one
// rounding (and the linker keeps one copy of each inline function for all units).
#pragma once

#include <cmath>
#include <cstdint>

#include "options.h"

#if defined(__CUDACC__)
#define FASTPREF_HOST_DEVICE __host__ __device__
#else
#define FASTPREF_HOST_DEVICE
#endif

namespace fastpref::head {

template <class Acc>
FASTPREF_HOST_DEVICE inline Acc stable_sigmoid(Acc x) {  // exp of a non-positive number: no overflow
  const Acc e = std::exp(-std::abs(x));
  return x >= Acc(0) ? Acc(1) / (Acc(1) + e) : e / (Acc(1) + e);
}

template <class Acc>
FASTPREF_HOST_DEVICE inline Acc stable_softplus(Acc x) {  // max(x, 0) + log1p(exp(-|x|)); NaN stays NaN
  return (x > Acc(0) ? x : Acc(0)) + std::log1p(std::exp(-std::abs(x)));
}

// Errors (§2): e[i] = (sum of row i's chunk partial sums, in chunk order) / D.
template <class Acc>
FASTPREF_HOST_DEVICE inline Acc sample_error(const Acc* partial, int64_t n_chunks, int64_t features) {
  Acc sum = Acc(0);
  for (int64_t c = 0; c < n_chunks; ++c) sum += partial[c];
  return sum / static_cast<Acc>(features);
}

// l (§2) of one model for pair j: (e_ref[j] - e_m[j]) - (e_ref[j+B] - e_m[j+B]).
template <class Acc>
FASTPREF_HOST_DEVICE inline Acc pair_logit(Acc ref_w, Acc ref_l, Acc err_w, Acc err_l) {
  return (ref_w - err_w) - (ref_l - err_l);
}

// Metric (§3), official preset: the norm that divides one model's l over the batch,
// max(||l_m||, 1e-12) keeping NaN.
template <class Acc>
FASTPREF_HOST_DEVICE inline Acc logit_norm(const Acc* logit, int64_t batch) {
  Acc sq = Acc(0);
  for (int64_t j = 0; j < batch; ++j) sq += logit[j] * logit[j];
  const Acc norm = std::sqrt(sq);
  return norm < static_cast<Acc>(1e-12) ? static_cast<Acc>(1e-12) : norm;
}

// Metric (§3): rho * l, divided by logit_norm under the official preset.
template <class Acc>
FASTPREF_HOST_DEVICE inline Acc scaled_logit(Preset preset, Acc rho, Acc logit, Acc norm) {
  return preset == Preset::kOfficial ? rho * logit / norm : rho * logit;
}

template <class Acc>
struct Metric {
  Acc confidence;  // c
  Acc stability;   // s
  Acc u;           // c * s
};

// Metric (§3) of one pair from the M = n_rows models' scaled and raw l (policy first, then the
// EMA models), element r at [r * stride].
template <class Acc>
FASTPREF_HOST_DEVICE inline Metric<Acc> minority_metric(Preset preset, const Acc* scaled, const Acc* logit,
                                                        int64_t n_rows, int64_t stride) {
  const Acc one = Acc(1);
  Metric<Acc> out;
  Acc sig = Acc(0);
  for (int64_t r = 0; r < n_rows; ++r) sig += stable_sigmoid(scaled[r * stride]);
  out.confidence = one - sig / static_cast<Acc>(n_rows);
  out.stability = one;
  if (n_rows > 1) {
    const Acc* spread = preset == Preset::kOfficial ? scaled : logit;
    Acc total = Acc(0);
    for (int64_t r = 0; r < n_rows; ++r) total += spread[r * stride];
    const Acc mean = total / static_cast<Acc>(n_rows);
    Acc dev2 = Acc(0);
    for (int64_t r = 0; r < n_rows; ++r) {
      const Acc dev = spread[r * stride] - mean;
      dev2 += dev * dev;
    }
    const Acc var = dev2 / static_cast<Acc>(n_rows - 1);
    if (preset == Preset::kOfficial) {
      const Acc std_dev = std::sqrt(var);
      out.stability = std_dev > one ? one : std_dev;  // min(std, 1) keeping NaN
    } else {
      out.stability = var;
    }
  }
  out.u = out.confidence * out.stability;
  return out;
}

// Weight W (§4).
template <class Acc>
FASTPREF_HOST_DEVICE inline Acc pair_weight(Weighting weighting, Acc k1, Acc u) {
  const Acc one = Acc(1);
  switch (weighting) {
    case Weighting::kLinear:
      return one / (one + k1 * u);
    case Weighting::kSquare:
      return one / (one + k1 * u * u);
    case Weighting::kSqrt:
      return one / (one + k1 * std::sqrt(u));
    case Weighting::kSigmoid:
      return one / (one + std::exp(k1 * u));
    case Weighting::kNone:
      break;
  }
  return one;
}

// The default margin offset c2 (§4): the batch mean of l_theta.
template <class Acc>
FASTPREF_HOST_DEVICE inline Acc batch_mean(const Acc* values, int64_t batch) {
  Acc total = Acc(0);
  for (int64_t j = 0; j < batch; ++j) total += values[j];
  return total / static_cast<Acc>(batch);
}

// Margin Gamma (§4).
template <class Acc>
FASTPREF_HOST_DEVICE inline Acc pair_margin(Margin margin, Acc k2, Acc c2, Acc u) {
  switch (margin) {
    case Margin::kQuadratic:
      return k2 * u * u + c2;
    case Margin::kLinear:
      return k2 * u + c2;
    case Margin::kNone:
      break;
  }
  return Acc(0);
}

template <class Acc>
struct PairLoss {
  Acc loss;  // L_j
  Acc coef;  // a_j = dL_j / dl_theta[j]
};

// Per-pair loss (§5, §5b) with y = beta * l_theta - Gamma, and its derivative in l_theta (§6; the
// table of a_j is on pair_loss in fastpref/loss/triton/pair_head.py). `soft_label` (y~) is read by
// "dedpo" only.
template <class Acc>
FASTPREF_HOST_DEVICE inline PairLoss<Acc> pair_loss(LossType loss_type, Acc beta, Acc eps, Acc tau, Acc l_theta,
                                                    Acc weight, Acc margin, Acc soft_label) {
  const Acc one = Acc(1);
  const Acc w = weight;
  const Acc y = beta * l_theta - margin;
  switch (loss_type) {
    case LossType::kSigmoid:  // DPO
      return {w * stable_softplus(-y), -w * beta * stable_sigmoid(-y)};
    case LossType::kIpo: {
      const Acc resid = l_theta - margin / beta - one / (Acc(2) * tau);
      return {w * resid * resid, Acc(2) * w * resid};
    }
    case LossType::kHinge: {  // relu written so that NaN propagates
      const Acc gap = one - y;
      return {w * (gap < Acc(0) ? Acc(0) : gap), -w * beta * (gap > Acc(0) ? one : Acc(0))};
    }
    case LossType::kRobust:
      return {w * ((one - eps) * stable_softplus(-y) - eps * stable_softplus(y)) / (one - Acc(2) * eps),
              -w * beta * ((one - eps) * stable_sigmoid(-y) + eps * stable_sigmoid(y)) / (one - Acc(2) * eps)};
    case LossType::kCdpo:
      return {w * ((one - eps) * stable_softplus(-y) + eps * stable_softplus(y)),
              w * beta * (eps * stable_sigmoid(y) - (one - eps) * stable_sigmoid(-y))};
    case LossType::kDedpo:
      break;
  }
  return {w * (stable_softplus(-y) + (one - soft_label) * y), w * beta * (stable_sigmoid(y) - soft_label)};
}

// Reduction (§5): a_j of the reduced loss (the mean divides by B) ...
template <class Acc>
FASTPREF_HOST_DEVICE inline Acc reduced_coef(Reduction reduction, Acc coef, int64_t batch) {
  return reduction == Reduction::kMean ? coef / static_cast<Acc>(batch) : coef;
}

// ... and the loss from the sum of the per-pair losses ("none" keeps them per pair instead).
template <class Acc>
FASTPREF_HOST_DEVICE inline Acc reduced_loss(Reduction reduction, Acc total, int64_t batch) {
  return reduction == Reduction::kMean ? total / static_cast<Acc>(batch) : total;
}

// Implicit accuracy (§8): the share of pairs with z > 0, ties counted half.
template <class Acc>
FASTPREF_HOST_DEVICE inline Acc implicit_accuracy(Acc wins, Acc ties, int64_t batch) {
  return (wins + Acc(0.5) * ties) / static_cast<Acc>(batch);
}

// ---------------------------------------------------------------------------------------------
// The head of a whole batch, from the error pass's chunk partial sums to the op's outputs, as
// steps that one executor runs: `exec.for_each(n, f)` calls f(i) for every i in [0, n) in any
// order or in parallel (each f(i) writes only its own elements), and `exec.sync()` makes every
// earlier step's writes visible. The CPU runs it on one thread (SerialExec); a CUDA kernel on the
// threads of one block (for_each over the threads, sync = __syncthreads). Batch-wide sums (the
// norms, c2, the loss total, the implicit accuracy) run on one worker in pair order, so both
// devices add in the same order.
// ---------------------------------------------------------------------------------------------

template <class Acc>
struct HeadSettings {
  Acc beta, rho, k1, k2;
  Acc c2;  // read when has_c2; otherwise c2 is the batch mean of l_theta
  bool has_c2;
  Acc eps, tau;
  Preset preset;
  Weighting weighting;
  Margin margin;
  LossType loss_type;
  Reduction reduction;
};

template <class Acc>
struct HeadBuffers {
  // Inputs: the error pass's sums, partial[(m * 2B + i) * n_chunks + c] for model m (0 policy,
  // 1 reference, 2.. EMA), row i, chunk c; the soft label y~ ([B] with a stride; "dedpo" only).
  const Acc* partial;
  int64_t models, batch, n_chunks, features;
  const Acc* soft;
  int64_t soft_stride;
  // Scratch: err [models, 2B], logit and scaled [models - 1, B], pair_loss [B], c2 [1].
  Acc *err, *logit, *scaled, *pair_loss, *c2;
  // Outputs: loss [] or [B], coef [B], pair_stats [7, B] (z, l_theta, u, c, s, W, Gamma),
  // sample_err [2, 2B] (policy, reference), accuracy [].
  Acc *loss, *coef, *pair_stats, *sample_err, *accuracy;
  // Scratch elements the buffers above need.
  static constexpr int64_t scratch_size(int64_t models, int64_t batch) {
    return models * 2 * batch + 2 * (models - 1) * batch + batch + 1;
  }
  // Points err .. c2 into `scratch` (scratch_size elements).
  FASTPREF_HOST_DEVICE void set_scratch(Acc* scratch) {
    err = scratch;
    logit = err + models * 2 * batch;
    scaled = logit + (models - 1) * batch;
    pair_loss = scaled + (models - 1) * batch;
    c2 = pair_loss + batch;
  }
};

// The executor of one CPU thread.
struct SerialExec {
  template <class F>
  void for_each(int64_t n, F&& f) const {
    for (int64_t i = 0; i < n; ++i) f(i);
  }
  void sync() const {}
};

template <class Acc, class Exec>
FASTPREF_HOST_DEVICE void batch_head(const Exec& exec, const HeadSettings<Acc>& set, const HeadBuffers<Acc>& buf) {
  const int64_t batch = buf.batch;
  const int64_t rows = 2 * batch;
  const int64_t n_rows = buf.models - 1;  // metric rows: the policy (r = 0), the EMA models (r >= 1)
  Acc* err = buf.err;
  Acc* logit = buf.logit;
  Acc* scaled = buf.scaled;

  // Per-sample errors of every model; the policy's and the reference's are also an output.
  exec.for_each(buf.models * rows, [&](int64_t k) {
    err[k] = sample_error(buf.partial + k * buf.n_chunks, buf.n_chunks, buf.features);
    if (k < 2 * rows) buf.sample_err[k] = err[k];
  });
  exec.sync();

  // l of metric row r (model 0 for r = 0, model r + 1 for r >= 1), pair j.
  const Acc* ref = err + rows;
  exec.for_each(batch, [&](int64_t j) {
    for (int64_t r = 0; r < n_rows; ++r) {
      const Acc* model = err + (r == 0 ? 0 : r + 1) * rows;
      logit[r * batch + j] = pair_logit(ref[j], ref[j + batch], model[j], model[j + batch]);
    }
  });
  exec.sync();

  // The metric's scaled l, row by row; the margin offset c2 (worker n_rows).
  const Acc* l_theta = logit;
  exec.for_each(n_rows + 1, [&](int64_t r) {
    if (r == n_rows) {
      buf.c2[0] = set.has_c2 ? set.c2 : batch_mean(l_theta, batch);
      return;
    }
    const Acc* row = logit + r * batch;
    const Acc norm = set.preset == Preset::kOfficial ? logit_norm(row, batch) : Acc(1);
    for (int64_t j = 0; j < batch; ++j) scaled[r * batch + j] = scaled_logit(set.preset, set.rho, row[j], norm);
  });
  exec.sync();

  // Pair by pair: u, W, Gamma, the loss and a_j, the stats.
  const Acc c2 = buf.c2[0];
  Acc* stats = buf.pair_stats;
  exec.for_each(batch, [&](int64_t j) {
    const Metric<Acc> metric = minority_metric(set.preset, scaled + j, logit + j, n_rows, batch);
    const Acc weight = pair_weight(set.weighting, set.k1, metric.u);
    const Acc margin = pair_margin(set.margin, set.k2, c2, metric.u);
    const Acc label = set.loss_type == LossType::kDedpo ? buf.soft[j * buf.soft_stride] : Acc(0);
    const PairLoss<Acc> pair = pair_loss(set.loss_type, set.beta, set.eps, set.tau, l_theta[j], weight, margin, label);
    (set.reduction == Reduction::kNone ? buf.loss : buf.pair_loss)[j] = pair.loss;
    buf.coef[j] = reduced_coef(set.reduction, pair.coef, batch);
    stats[0 * batch + j] = set.beta * l_theta[j];  // z
    stats[1 * batch + j] = l_theta[j];
    stats[2 * batch + j] = metric.u;
    stats[3 * batch + j] = metric.confidence;
    stats[4 * batch + j] = metric.stability;
    stats[5 * batch + j] = weight;
    stats[6 * batch + j] = margin;
  });
  exec.sync();

  // The reduced loss and the implicit accuracy, summed in pair order.
  exec.for_each(1, [&](int64_t) {
    if (set.reduction != Reduction::kNone) {
      Acc total = Acc(0);
      for (int64_t j = 0; j < batch; ++j) total += buf.pair_loss[j];
      buf.loss[0] = reduced_loss(set.reduction, total, batch);
    }
    Acc wins = Acc(0), ties = Acc(0);
    for (int64_t j = 0; j < batch; ++j) {
      wins += stats[j] > Acc(0) ? Acc(1) : Acc(0);
      ties += stats[j] == Acc(0) ? Acc(1) : Acc(0);
    }
    buf.accuracy[0] = implicit_accuracy(wins, ties, batch);
  });
}

}  // namespace fastpref::head
