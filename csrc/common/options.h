// The string options of the loss as the integer codes the ops receive in `modes`: the values of
// the Python IntEnums in fastpref/loss/options.py. fastpref._C.option_codes() returns
// kOptionCodes, and tests/loss/test_native.py checks it against the Python enums.
#pragma once

#include <cstdint>

namespace fastpref {

enum class Preset : int64_t { kOfficial = 0, kPaper = 1 };
enum class Weighting : int64_t { kLinear = 0, kSquare = 1, kSqrt = 2, kSigmoid = 3, kNone = 4 };
enum class Margin : int64_t { kQuadratic = 0, kLinear = 1, kNone = 2 };
enum class LossType : int64_t { kSigmoid = 0, kIpo = 1, kHinge = 2, kRobust = 3, kCdpo = 4, kDedpo = 5 };
enum class Reduction : int64_t { kMean = 0, kSum = 1, kNone = 2 };

// Position of each option in `modes` (fastpref.loss.options.MODE_OPTIONS).
enum Mode : int { kPresetMode = 0, kWeightingMode, kMarginMode, kLossTypeMode, kReductionMode, kNumModes };

// Python names of the options (the enum classes) in `modes` order.
inline constexpr const char* kModeNames[kNumModes] = {"Preset", "Weighting", "Margin", "LossType", "Reduction"};

// Every code, by option and Python member name.
struct OptionCode {
  Mode mode;
  const char* name;
  int64_t code;
};

inline constexpr OptionCode kOptionCodes[] = {
    {kPresetMode, "OFFICIAL", static_cast<int64_t>(Preset::kOfficial)},
    {kPresetMode, "PAPER", static_cast<int64_t>(Preset::kPaper)},
    {kWeightingMode, "LINEAR", static_cast<int64_t>(Weighting::kLinear)},
    {kWeightingMode, "SQUARE", static_cast<int64_t>(Weighting::kSquare)},
    {kWeightingMode, "SQRT", static_cast<int64_t>(Weighting::kSqrt)},
    {kWeightingMode, "SIGMOID", static_cast<int64_t>(Weighting::kSigmoid)},
    {kWeightingMode, "NONE", static_cast<int64_t>(Weighting::kNone)},
    {kMarginMode, "QUADRATIC", static_cast<int64_t>(Margin::kQuadratic)},
    {kMarginMode, "LINEAR", static_cast<int64_t>(Margin::kLinear)},
    {kMarginMode, "NONE", static_cast<int64_t>(Margin::kNone)},
    {kLossTypeMode, "SIGMOID", static_cast<int64_t>(LossType::kSigmoid)},
    {kLossTypeMode, "IPO", static_cast<int64_t>(LossType::kIpo)},
    {kLossTypeMode, "HINGE", static_cast<int64_t>(LossType::kHinge)},
    {kLossTypeMode, "ROBUST", static_cast<int64_t>(LossType::kRobust)},
    {kLossTypeMode, "CDPO", static_cast<int64_t>(LossType::kCdpo)},
    {kLossTypeMode, "DEDPO", static_cast<int64_t>(LossType::kDedpo)},
    {kReductionMode, "MEAN", static_cast<int64_t>(Reduction::kMean)},
    {kReductionMode, "SUM", static_cast<int64_t>(Reduction::kSum)},
    {kReductionMode, "NONE", static_cast<int64_t>(Reduction::kNone)},
};

// Whether `code` is a code of the option at position `mode` of `modes`.
inline bool is_option_code(int mode, int64_t code) {
  for (const OptionCode& entry : kOptionCodes) {
    if (entry.mode == mode && entry.code == code) return true;
  }
  return false;
}

}  // namespace fastpref
