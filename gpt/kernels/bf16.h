/* Scalar bf16 <-> float32 conversions shared by the kernels (gemv.c, xent.c): round to nearest even, as torch. */
#ifndef GPT_KERNELS_BF16_H
#define GPT_KERNELS_BF16_H
#include <stdint.h>
#include <string.h>

static inline uint16_t f32_to_bf16(float f) { /* NaN stays NaN (quiet), as in torch */
    uint32_t b;
    memcpy(&b, &f, 4);
    if ((b & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((b >> 16) | 0x40);
    b += 0x7fffu + ((b >> 16) & 1u);
    return (uint16_t)(b >> 16);
}

static inline float bf16_to_f32(uint16_t h) {
    uint32_t b = (uint32_t)h << 16;
    float f;
    memcpy(&f, &b, 4);
    return f;
}
#endif
