// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11),
// shared by the CPU (C++) and CUDA kernels of fastnoise.
//
// This is THE randomness contract of fastnoise/reference.py, bit for bit:
//   key     = (k0, k1)          = (seed lo, seed hi)
//   counter = (c0, c1, c2, c3)  = (ctr lo, ctr hi, 0, 0), ctr a 64-bit counter (mod 2**64)
//   10 rounds of
//     c0' = mulhi(0xCD9E8D57, c2) ^ c1 ^ k0     c1' = 0xCD9E8D57 * c2 (low word)
//     c2' = mulhi(0xD2511F53, c0) ^ c3 ^ k1     c3' = 0xD2511F53 * c0 (low word)
//     k0 += 0x9E3779B9;  k1 += 0xBB67AE85
// (identical to Random123 philox4x32_10 and Triton's tl.philox / tl.randint4x).
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FASTNOISE_HD __host__ __device__ __forceinline__
#else
#define FASTNOISE_HD inline
#endif

namespace fastnoise {

constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;
constexpr uint32_t kPhiloxRoundA = 0xD2511F53u;
constexpr uint32_t kPhiloxRoundB = 0xCD9E8D57u;

struct Words4 {
  uint32_t w[4];
};

FASTNOISE_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__) || defined(FASTNOISE_CUDA_EMU)  // the emulator's __umulhi
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// The four words of counter `ctr` (64-bit, high 64 bits of the 128-bit counter are zero)
// under the 64-bit key `seed`.
FASTNOISE_HD Words4 philox4x32_10(uint64_t ctr, uint64_t seed) {
  uint32_t c0 = static_cast<uint32_t>(ctr);
  uint32_t c1 = static_cast<uint32_t>(ctr >> 32);
  uint32_t c2 = 0u, c3 = 0u;
  uint32_t k0 = static_cast<uint32_t>(seed);
  uint32_t k1 = static_cast<uint32_t>(seed >> 32);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    const uint32_t hi_b = mulhi32(kPhiloxRoundB, c2);
    const uint32_t lo_b = kPhiloxRoundB * c2;
    const uint32_t hi_a = mulhi32(kPhiloxRoundA, c0);
    const uint32_t lo_a = kPhiloxRoundA * c0;
    c0 = hi_b ^ c1 ^ k0;
    c1 = lo_b;
    c2 = hi_a ^ c3 ^ k1;
    c3 = lo_a;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  Words4 out;
  out.w[0] = c0;
  out.w[1] = c1;
  out.w[2] = c2;
  out.w[3] = c3;
  return out;
}

}  // namespace fastnoise
