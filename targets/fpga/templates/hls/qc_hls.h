// qcompile streaming dataflow building blocks (Vitis HLS C++), shared by every generated layer.
//
// Streams carry words of LANES lanes of BITS bits: lane i is bits [i*BITS, (i+1)*BITS) of the word. Values follow
// qcompile's integer contract (docs/ops.md): activation codes p, weight codes q with v = 2q - wzero2[n], and
//   acc = 2 * sum_k q*p - wzero2[n] * sum_k p            (AND form, through bit planes: papers.md section 0)
//   acc = sum_k (2a-1)(2w-1) = SIMD - 2 popcount(a ^ w)  (xor form, 1-bit bipolar)
// Generated per layer (qc_top.cpp): the MVAU loop, its ROMs, the sliding-window generator, pools, width converters.
#ifndef QC_HLS_H
#define QC_HLS_H

#include <ap_int.h>
#include <hls_stream.h>
#include <stdint.h>

namespace qc {

// Bits needed to count 0..W.
template <int W> struct count_bits { static const int value = 1 + count_bits<W / 2>::value; };
template <> struct count_bits<0> { static const int value = 1; };

// Population count of a W-bit word: an adder tree once unrolled.
template <int W>
ap_uint<count_bits<W>::value> popcount(ap_uint<W> x) {
#pragma HLS INLINE
    ap_uint<count_bits<W>::value> n = 0;
    for (int i = 0; i < W; i++) {
#pragma HLS UNROLL
        n += x[i];
    }
    return n;
}

// Bit plane b of a word of LANES codes of BITS bits: bit i is bit b of lane i (wiring only).
template <int LANES, int BITS>
ap_uint<LANES> plane(ap_uint<LANES * BITS> x, int b) {
#pragma HLS INLINE
    ap_uint<LANES> p = 0;
    for (int i = 0; i < LANES; i++) {
#pragma HLS UNROLL
        p[i] = x[i * BITS + b];
    }
    return p;
}

// One SIMD-wide slice of the AND-form dot product, bit-serial over the planes (XNOR/AND-popcount at 1x1 bit):
//   2 * sum q*p - z * sum p,   sum q*p = sum_{b,j} 2^(b+j) popcount(plane_b(p) & plane_j(q)).
// w holds BW planes of SIMD bits: plane j is bits [j*SIMD, (j+1)*SIMD).
template <int SIMD, int BA, int BW, int ACC_W>
ap_int<ACC_W> dot_and(ap_uint<SIMD * BA> x, ap_uint<SIMD * BW> w, ap_int<ACC_W> z) {
#pragma HLS INLINE
    ap_int<ACC_W> qp = 0, sp = 0;
    for (int b = 0; b < BA; b++) {
#pragma HLS UNROLL
        ap_uint<SIMD> xb = plane<SIMD, BA>(x, b);
        sp += ap_int<ACC_W>(popcount<SIMD>(xb)) << b;
        for (int j = 0; j < BW; j++) {
#pragma HLS UNROLL
            ap_uint<SIMD> wj = w.range(j * SIMD + SIMD - 1, j * SIMD);
            qp += ap_int<ACC_W>(popcount<SIMD>(ap_uint<SIMD>(xb & wj))) << (b + j);
        }
    }
    return 2 * qp - z * sp;
}

// xor form (1-bit activations and weights, both read as +-1): SIMD - 2 popcount(a XOR w).
template <int SIMD, int ACC_W>
ap_int<ACC_W> dot_xor(ap_uint<SIMD> x, ap_uint<SIMD> w) {
#pragma HLS INLINE
    return ap_int<ACC_W>(SIMD) - 2 * ap_int<ACC_W>(popcount<SIMD>(ap_uint<SIMD>(x ^ w)));
}

// IEEE-754 bit patterns <-> float (ROMs hold bit patterns so NaN/inf thresholds survive as they are).
inline float bits_float(ap_uint<32> b) {
#pragma HLS INLINE
    union { uint32_t u; float f; } c;
    c.u = (uint32_t)b.to_uint();
    return c.f;
}
inline ap_uint<32> float_bits(float f) {
#pragma HLS INLINE
    union { uint32_t u; float f; } c;
    c.f = f;
    return ap_uint<32>(c.u);
}

// Lane-wise max of two words of LANES codes (max pooling on codes).
template <int LANES, int BITS>
ap_uint<LANES * BITS> lane_max(ap_uint<LANES * BITS> a, ap_uint<LANES * BITS> b) {
#pragma HLS INLINE
    ap_uint<LANES * BITS> m;
    for (int i = 0; i < LANES; i++) {
#pragma HLS UNROLL
        ap_uint<BITS> x = a.range(i * BITS + BITS - 1, i * BITS), y = b.range(i * BITS + BITS - 1, i * BITS);
        m.range(i * BITS + BITS - 1, i * BITS) = x > y ? x : y;
    }
    return m;
}

// Lane width converter: TOTAL values per frame from IN-lane words to OUT-lane words, CHUNK = gcd(IN, OUT) values
// per cycle. The value order is unchanged, so only the grouping into words differs.
template <int IN, int OUT, int BITS, int TOTAL, int CHUNK>
void dwc(hls::stream<ap_uint<IN * BITS> > &in, hls::stream<ap_uint<OUT * BITS> > &out) {
    ap_uint<IN * BITS> ibuf = 0;
    ap_uint<OUT * BITS> obuf = 0;
    int ileft = 0, ofill = 0;
    for (int i = 0; i < TOTAL / CHUNK; i++) {
#pragma HLS PIPELINE II=1
        if (ileft == 0) {
            ibuf = in.read();
            ileft = IN;
        }
        obuf.range((ofill + CHUNK) * BITS - 1, ofill * BITS) = ibuf.range(CHUNK * BITS - 1, 0);
        ibuf = ibuf >> (CHUNK * BITS);
        ileft -= CHUNK;
        ofill += CHUNK;
        if (ofill == OUT) {
            out.write(obuf);
            ofill = 0;
        }
    }
}

// Sliding-window generator (FINN's ConvolutionInputGenerator): pixels in raster order, CF = C/LANES words each,
// out: for every output pixel (oy, ox) the taps (ky, kx) in tap-major order, CF words each: the im2col row in the
// (ky, kx, c) order of the weights. Padding is code 0. A ring of (KH-1)*DH+1 input rows; one loop that reads an
// input word and/or writes a window word each cycle, so it runs at max(reads, writes) cycles per frame.
template <int LANES, int BITS, int CF, int H, int W, int KH, int KW, int SH, int SW, int PT, int PL, int DH, int DW,
          int HO, int WO>
void swg(hls::stream<ap_uint<LANES * BITS> > &in, hls::stream<ap_uint<LANES * BITS> > &out) {
    const int RING = (KH - 1) * DH + 1;
    const int READS = H * W * CF, WRITES = HO * WO * KH * KW * CF;
    ap_uint<LANES * BITS> ring[RING][W][CF];
    int reads = 0, writes = 0;
    int rrow = 0, rcol = 0, rcf = 0;                       // next input word to read
    int oy = 0, ox = 0, ky = 0, kx = 0, cf = 0;             // next window word to write
    for (int it = 0; it < READS + WRITES; it++) {  // at most one of each per cycle: max(READS, WRITES) + fill
#pragma HLS PIPELINE II=1
        if (reads == READS && writes == WRITES) break;
        int first_row = oy * SH - PT;                       // oldest input row the current output row needs
        if (reads < READS && (writes == WRITES || rrow - RING < first_row)) {
            ring[rrow % RING][rcol][rcf] = in.read();
            reads++;
            if (++rcf == CF) { rcf = 0; if (++rcol == W) { rcol = 0; rrow++; } }
        }
        if (writes < WRITES) {
            int iy = first_row + ky * DH, ix = ox * SW - PL + kx * DW;
            bool inside = iy >= 0 && iy < H && ix >= 0 && ix < W;
            int need = (iy * W + ix) * CF + cf;             // words read before this one is in the ring
            if (!inside || need < reads) {
                out.write(inside ? ring[iy % RING][ix][cf] : ap_uint<LANES * BITS>(0));
                writes++;
                if (++cf == CF) { cf = 0; if (++kx == KW) { kx = 0; if (++ky == KH) { ky = 0;
                    if (++ox == WO) { ox = 0; oy++; } } } }
            }
        }
    }
}

// Max over a window that equals its strides (a folded 2x2/2 pool): conv pixels of CF words in raster order in,
// pooled pixels out; rows and columns past the last whole window are read and dropped (floor mode).
template <int LANES, int BITS, int CF, int H, int W, int PH, int PW>
void pool_stream(hls::stream<ap_uint<LANES * BITS> > &in, hls::stream<ap_uint<LANES * BITS> > &out) {
    const int WP = W / PW;
    ap_uint<LANES * BITS> acc[WP][CF];
    for (int y = 0; y < H; y++) {
        for (int x = 0; x < W; x++) {
            for (int c = 0; c < CF; c++) {
#pragma HLS PIPELINE II=1
                ap_uint<LANES * BITS> v = in.read();
                int xo = x / PW;
                bool used = y < (H / PH) * PH && x < WP * PW;
                if (used) {
                    bool first = y % PH == 0 && x % PW == 0;
                    ap_uint<LANES * BITS> m = first ? v : lane_max<LANES, BITS>(acc[xo][c], v);
                    acc[xo][c] = m;
                    if (y % PH == PH - 1 && x % PW == PW - 1) out.write(m);
                }
            }
        }
    }
}

// Max over each window of a sliding-window generator's output (a general MaxPoolCodes: KH*KW taps of CF words).
template <int LANES, int BITS, int CF, int PIXELS, int TAPS>
void window_max(hls::stream<ap_uint<LANES * BITS> > &in, hls::stream<ap_uint<LANES * BITS> > &out) {
    ap_uint<LANES * BITS> acc[CF];
    for (int p = 0; p < PIXELS; p++) {
        for (int t = 0; t < TAPS; t++) {
            for (int c = 0; c < CF; c++) {
#pragma HLS PIPELINE II=1
                ap_uint<LANES * BITS> v = in.read();
                ap_uint<LANES * BITS> m = t == 0 ? v : lane_max<LANES, BITS>(acc[c], v);
                acc[c] = m;
                if (t == TAPS - 1) out.write(m);
            }
        }
    }
}

// Input quantizer folded into the first layer: float lanes (bit patterns) -> codes #{k : x >= T[k]}
// (NaN thresholds never count, a NaN input gets code 0: IEEE comparisons are false).
template <int LANES, int BITS, int WORDS, int L>
void quantize_input(hls::stream<ap_uint<LANES * 32> > &in, hls::stream<ap_uint<LANES * BITS> > &out,
                    const ap_uint<32> thresholds[L]) {
    for (int i = 0; i < WORDS; i++) {
#pragma HLS PIPELINE II=1
        ap_uint<LANES * 32> x = in.read();
        ap_uint<LANES * BITS> codes;
        for (int lane = 0; lane < LANES; lane++) {
#pragma HLS UNROLL
            float v = bits_float(x.range(lane * 32 + 31, lane * 32));
            ap_uint<BITS> code = 0;
            for (int k = 0; k < L; k++) {
#pragma HLS UNROLL
                code += v >= bits_float(thresholds[k]) ? 1 : 0;
            }
            codes.range(lane * BITS + BITS - 1, lane * BITS) = code;
        }
        out.write(codes);
    }
}

}  // namespace qc

#endif
