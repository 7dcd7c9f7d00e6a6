// Element types of the KV cache and activations, and the host-side conversions the CPU
// path uses to widen f16/bf16 to f32 in registers and to round results back.
#pragma once

#include <cstdint>
#include <cstring>

namespace pagedlm {

// e4m3 / e5m2: the FP8 formats of a KV cache (torch.float8_e4m3fn / torch.float8_e5m2).
enum class DType : int { f32 = 0, f16 = 1, bf16 = 2, e4m3 = 3, e5m2 = 4 };

inline int dtype_size(DType t) { return t == DType::f32 ? 4 : (t == DType::e4m3 || t == DType::e5m2) ? 1 : 2; }

inline float bits_to_float(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline uint32_t float_to_bits(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  return bits;
}

inline float bf16_to_float(uint16_t h) { return bits_to_float(static_cast<uint32_t>(h) << 16); }

inline uint16_t float_to_bf16(float f) {
  uint32_t bits = float_to_bits(f);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40);  // quiet NaN
  bits += 0x7fffu + ((bits >> 16) & 1u);  // round to nearest even
  return static_cast<uint16_t>(bits >> 16);
}

inline float f16_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t mant = h & 0x3ffu;
  if (exp == 0x1f) return bits_to_float(sign | 0x7f800000u | (mant << 13));  // inf / NaN
  if (exp != 0) return bits_to_float(sign | ((exp + 112) << 23) | (mant << 13));
  // Zero or subnormal: mant * 2^-24.
  float magnitude = static_cast<float>(mant) * 5.9604644775390625e-8f;
  return sign ? -magnitude : magnitude;
}

inline uint16_t float_to_f16(float f) {
  const uint32_t bits = float_to_bits(f);
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  const uint32_t abs = bits & 0x7fffffffu;
  if (abs > 0x7f800000u) return sign | 0x7e00u;                  // NaN
  if (abs >= 0x477ff000u) return sign | 0x7c00u;                 // overflows to inf (incl. inf)
  if (abs < 0x38800000u) {                                       // subnormal or zero in f16
    // Scale so the f16 subnormal unit is 1.0, round to nearest even with the FPU.
    float scaled = bits_to_float(abs) * 16777216.0f;             // 2^24
    uint32_t m = static_cast<uint32_t>(scaled);
    float rem = scaled - static_cast<float>(m);
    if (rem > 0.5f || (rem == 0.5f && (m & 1u))) ++m;
    return sign | static_cast<uint16_t>(m);
  }
  uint32_t rounded = abs + 0xfffu + ((abs >> 13) & 1u);         // round to nearest even at bit 13
  return sign | static_cast<uint16_t>((rounded - 0x38000000u) >> 13);
}

// ---- FP8 KV caches ---------------------------------------------------------------------
// e4m3fn (max 448, no inf, NaN = S.1111.111) and e5m2 (max 57344, IEEE-like inf/NaN). A cache
// stores saturate(x / scale) rounded to nearest even (saturated to the format's finite max,
// infinities included; NaN stays NaN); readers use stored * scale.
inline bool is_fp8(DType t) { return t == DType::e4m3 || t == DType::e5m2; }

inline float fp8_max(DType t) { return t == DType::e4m3 ? 448.0f : 57344.0f; }

// The exact value of an FP8 code (every FP8 value is a float32 value).
inline float fp8_code_to_float(uint8_t code, DType t) {
  const uint32_t sign = static_cast<uint32_t>(code & 0x80u) << 24;
  const int mbits = t == DType::e4m3 ? 3 : 2, bias = t == DType::e4m3 ? 7 : 15;
  const uint32_t exp = (code & 0x7fu) >> mbits, mant = code & ((1u << mbits) - 1);
  if (t == DType::e4m3 && exp == 15 && mant == 7) return bits_to_float(sign | 0x7fc00000u);
  if (t == DType::e5m2 && exp == 31) return bits_to_float(sign | (mant ? 0x7fc00000u : 0x7f800000u));
  if (exp == 0) {  // zero or subnormal: mant * 2^(1 - bias - mbits)
    const float magnitude = static_cast<float>(mant) * bits_to_float(static_cast<uint32_t>(127 + 1 - bias - mbits) << 23);
    return sign ? -magnitude : magnitude;
  }
  return bits_to_float(sign | ((exp + 127 - bias) << 23) | (mant << (23 - mbits)));
}

// The 256 values of a format, for the CPU readers.
struct Fp8Table {
  float value[256];
  explicit Fp8Table(DType t) {
    for (int i = 0; i < 256; ++i) value[i] = fp8_code_to_float(static_cast<uint8_t>(i), t);
  }
};

inline const float* fp8_table(DType t) {
  static const Fp8Table e4m3(DType::e4m3), e5m2(DType::e5m2);
  return t == DType::e4m3 ? e4m3.value : e5m2.value;
}

// f32 -> FP8: round to nearest even, saturating to +-max (infinities too); NaN stays NaN.
inline uint8_t float_to_fp8(float f, DType t) {
  const int mbits = t == DType::e4m3 ? 3 : 2, bias = t == DType::e4m3 ? 7 : 15;
  const uint32_t bits = float_to_bits(f);
  const uint8_t sign = static_cast<uint8_t>((bits >> 24) & 0x80u);
  const uint32_t abs = bits & 0x7fffffffu;
  if (abs > 0x7f800000u) return sign | 0x7fu;  // NaN (e4m3fn's only NaN; an e5m2 NaN)
  const uint8_t max_code = t == DType::e4m3 ? 0x7eu : 0x7bu;
  if (abs >= float_to_bits(fp8_max(t))) return sign | max_code;  // everything above rounds to max or beyond
  const int exp = static_cast<int>(abs >> 23) - 127;
  if (exp < 1 - bias) {  // below the smallest normal: multiples of 2^(1 - bias - mbits)
    const float scaled = bits_to_float(abs) * bits_to_float(static_cast<uint32_t>(127 + bias - 1 + mbits) << 23);
    uint32_t m = static_cast<uint32_t>(scaled);
    const float rem = scaled - static_cast<float>(m);
    if (rem > 0.5f || (rem == 0.5f && (m & 1u))) ++m;  // m == 2^mbits is the smallest normal's code
    return sign | static_cast<uint8_t>(m);
  }
  const int shift = 23 - mbits;
  const uint32_t rounded = abs + ((1u << (shift - 1)) - 1u) + ((abs >> shift) & 1u);  // nearest even
  return sign | static_cast<uint8_t>((rounded >> shift) - (static_cast<uint32_t>(127 - bias) << mbits));
}

// A scale of an FP8 cache as the kernels take it: `count` float32 values at `data` (1: one for all
// kv heads; num_kv_heads: one per head), or, with data null, `value`. Checked finite and > 0.
struct KVScale {
  const float* data = nullptr;
  int32_t count = 0;
  float value = 1.0f;
};

inline float kv_scale_at(const KVScale& s, int32_t kv_head) {
  return s.data ? s.data[s.count == 1 ? 0 : kv_head] : s.value;
}

// Loads/stores one element of any 16/32-bit dtype as f32.
inline float load_as_float(const void* base, int64_t i, DType t) {
  switch (t) {
    case DType::f32: return static_cast<const float*>(base)[i];
    case DType::f16: return f16_to_float(static_cast<const uint16_t*>(base)[i]);
    default: return bf16_to_float(static_cast<const uint16_t*>(base)[i]);
  }
}

inline void store_from_float(void* base, int64_t i, DType t, float v) {
  switch (t) {
    case DType::f32: static_cast<float*>(base)[i] = v; break;
    case DType::f16: static_cast<uint16_t*>(base)[i] = float_to_f16(v); break;
    default: static_cast<uint16_t*>(base)[i] = float_to_bf16(v); break;
  }
}

// Widens n contiguous elements to f32 (FP8: the stored values, not yet scaled).
inline void widen(const void* src, DType t, int n, float* dst) {
  if (is_fp8(t)) {
    const float* table = fp8_table(t);
    const uint8_t* s = static_cast<const uint8_t*>(src);
    for (int i = 0; i < n; ++i) dst[i] = table[s[i]];
    return;
  }
  switch (t) {
    case DType::f32: std::memcpy(dst, src, sizeof(float) * n); break;
    case DType::f16: {
      const uint16_t* s = static_cast<const uint16_t*>(src);
      for (int i = 0; i < n; ++i) dst[i] = f16_to_float(s[i]);
      break;
    }
    default: {
      const uint16_t* s = static_cast<const uint16_t*>(src);
      for (int i = 0; i < n; ++i) dst[i] = bf16_to_float(s[i]);
      break;
    }
  }
}

}  // namespace pagedlm
