// The positions of the ops' `settings` and `modes` arguments, and the string options of the loss
// as the integer codes the ops receive in `modes`: the values of the Python IntEnums in
// fastpref/loss/options.py. fastpref._C.op_slots() returns kSettingSlots and kModeSlots,
// fastpref._C.option_codes() kOptionCodes, and tests/loss/test_native.py checks both against the
// Python enums.
#pragma once

#include <cstdint>

namespace fastpref {

enum class Preset : int64_t { kOfficial = 0, kPaper = 1 };
enum class Weighting : int64_t { kLinear = 0, kSquare = 1, kSqrt = 2, kSigmoid = 3, kNone = 4 };
enum class Margin : int64_t { kQuadratic = 0, kLinear = 1, kNone = 2 };
enum class LossType : int64_t { kSigmoid = 0, kIpo = 1, kHinge = 2, kRobust = 3, kCdpo = 4, kDedpo = 5 };
enum class Reduction : int64_t { kMean = 0, kSum = 1, kNone = 2 };

// Position of each scalar in `settings` (fastpref.loss.options.SettingSlot).
enum SettingSlot : int { kBetaSlot = 0, kRhoSlot, kK1Slot, kK2Slot, kC2Slot, kEpsSlot, kTauSlot, kNumSettingSlots };

// Position of each option's code in `modes` (fastpref.loss.options.ModeSlot).
enum ModeSlot : int { kPresetSlot = 0, kWeightingSlot, kMarginSlot, kLossTypeSlot, kReductionSlot, kNumModeSlots };

// Every slot of both arguments by its Python member name.
struct SlotName {
  int slot;
  const char* name;
};

inline constexpr SlotName kSettingSlots[] = {
    {kBetaSlot, "BETA"}, {kRhoSlot, "RHO"}, {kK1Slot, "K1"},   {kK2Slot, "K2"},
    {kC2Slot, "C2"},     {kEpsSlot, "EPS"}, {kTauSlot, "TAU"},
};

inline constexpr SlotName kModeSlots[] = {
    {kPresetSlot, "PRESET"},      {kWeightingSlot, "WEIGHTING"}, {kMarginSlot, "MARGIN"},
    {kLossTypeSlot, "LOSS_TYPE"}, {kReductionSlot, "REDUCTION"},
};

// Python names of the options (the enum classes) by slot of `modes` (fastpref.loss.options.MODE_OPTIONS).
inline constexpr const char* kModeOptionNames[kNumModeSlots] = {"Preset", "Weighting", "Margin", "LossType",
                                                                "Reduction"};

// Every code, by option and Python member name.
struct OptionCode {
  ModeSlot slot;
  const char* name;
  int64_t code;
};

inline constexpr OptionCode kOptionCodes[] = {
    {kPresetSlot, "OFFICIAL", static_cast<int64_t>(Preset::kOfficial)},
    {kPresetSlot, "PAPER", static_cast<int64_t>(Preset::kPaper)},
    {kWeightingSlot, "LINEAR", static_cast<int64_t>(Weighting::kLinear)},
    {kWeightingSlot, "SQUARE", static_cast<int64_t>(Weighting::kSquare)},
    {kWeightingSlot, "SQRT", static_cast<int64_t>(Weighting::kSqrt)},
    {kWeightingSlot, "SIGMOID", static_cast<int64_t>(Weighting::kSigmoid)},
    {kWeightingSlot, "NONE", static_cast<int64_t>(Weighting::kNone)},
    {kMarginSlot, "QUADRATIC", static_cast<int64_t>(Margin::kQuadratic)},
    {kMarginSlot, "LINEAR", static_cast<int64_t>(Margin::kLinear)},
    {kMarginSlot, "NONE", static_cast<int64_t>(Margin::kNone)},
    {kLossTypeSlot, "SIGMOID", static_cast<int64_t>(LossType::kSigmoid)},
    {kLossTypeSlot, "IPO", static_cast<int64_t>(LossType::kIpo)},
    {kLossTypeSlot, "HINGE", static_cast<int64_t>(LossType::kHinge)},
    {kLossTypeSlot, "ROBUST", static_cast<int64_t>(LossType::kRobust)},
    {kLossTypeSlot, "CDPO", static_cast<int64_t>(LossType::kCdpo)},
    {kLossTypeSlot, "DEDPO", static_cast<int64_t>(LossType::kDedpo)},
    {kReductionSlot, "MEAN", static_cast<int64_t>(Reduction::kMean)},
    {kReductionSlot, "SUM", static_cast<int64_t>(Reduction::kSum)},
    {kReductionSlot, "NONE", static_cast<int64_t>(Reduction::kNone)},
};

// Whether `code` is a code of the option at `slot` of `modes`.
inline bool is_option_code(int slot, int64_t code) {
  for (const OptionCode& entry : kOptionCodes) {
    if (entry.slot == slot && entry.code == code) return true;
  }
  return false;
}

}  // namespace fastpref
