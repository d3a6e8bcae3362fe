// Verilator harness for a qcompile RTL stream (a qc_mvau or a generated chain top): drives the AXI-stream input
// from a file of lane codes and writes every output beat's lanes, with random gaps on in_tvalid and random
// backpressure on out_tready. Geometry comes from -D: IN_LANES, IN_BITS, OUT_LANES, OUT_BITS.
// usage: harness IN_FILE OUT_FILE OUT_BEATS SEED VALID_PERCENT READY_PERCENT
// IN_FILE: the number of beats, then IN_LANES codes per beat. OUT_FILE: OUT_LANES unsigned values per line.
// stdout: "cycles C first_in F last_out L" (cycles = last output handshake - first input handshake + 1).
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <random>
#include <vector>
#include "Vtop.h"
#include "verilated.h"

template <typename T> static void set_bit(T& s, int pos, bool v) {
    s = static_cast<T>((s & ~(T(1) << pos)) | (T(v) << pos));
}
template <std::size_t W> static void set_bit(VlWide<W>& s, int pos, bool v) {
    s[pos / 32] = (s[pos / 32] & ~(1u << (pos % 32))) | (uint32_t(v) << (pos % 32));
}
template <typename T> static bool get_bit(const T& s, int pos) { return (s >> pos) & 1; }
template <std::size_t W> static bool get_bit(const VlWide<W>& s, int pos) { return (s[pos / 32] >> (pos % 32)) & 1; }

int main(int argc, char** argv) {
    if (argc != 7) {
        std::fprintf(stderr, "usage: %s IN_FILE OUT_FILE OUT_BEATS SEED VALID_PERCENT READY_PERCENT\n", argv[0]);
        return 2;
    }
    FILE* in = std::fopen(argv[1], "r");
    FILE* out = std::fopen(argv[2], "w");
    if (!in || !out) { std::perror("harness: open"); return 2; }
    long n_beats = 0;
    if (std::fscanf(in, "%ld", &n_beats) != 1) { std::fprintf(stderr, "harness: bad input file\n"); return 2; }
    std::vector<uint32_t> codes(n_beats * IN_LANES);
    for (auto& c : codes)
        if (std::fscanf(in, "%u", &c) != 1) { std::fprintf(stderr, "harness: short input file\n"); return 2; }
    std::fclose(in);
    const long out_beats = std::atol(argv[3]);
    std::mt19937 rng(std::atoi(argv[4]));
    const int valid_pct = std::atoi(argv[5]), ready_pct = std::atoi(argv[6]);
    std::uniform_int_distribution<int> pct(0, 99);

    auto ctx = std::make_unique<VerilatedContext>();
    auto top = std::make_unique<Vtop>(ctx.get());
    top->clk = 0;
    top->rst_n = 0;
    top->in_tvalid = 0;
    top->out_tready = 0;
    for (int i = 0; i < 4; ++i) { top->clk = !top->clk; top->eval(); }
    top->rst_n = 1;

    long beat = 0, got = 0, cycle = 0, first_in = -1, last_out = -1;
    const long limit = 1000 + 200 * (n_beats * IN_LANES + out_beats * OUT_LANES + 1) * 100 / (valid_pct * ready_pct / 100 + 1);
    while (got < out_beats && cycle < limit) {
        top->clk = 0;
        top->eval();
        // AXI: a raised tvalid stays up (with its data) until the handshake
        if (!top->in_tvalid && beat < n_beats && pct(rng) < valid_pct) {
            top->in_tvalid = 1;
            for (int l = 0; l < IN_LANES; ++l)
                for (int b = 0; b < IN_BITS; ++b) set_bit(top->in_tdata, l * IN_BITS + b, (codes[beat * IN_LANES + l] >> b) & 1);
        }
        top->out_tready = pct(rng) < ready_pct;
        top->eval();
        const bool in_fire = top->in_tvalid && top->in_tready;
        const bool out_fire = top->out_tvalid && top->out_tready;
        if (out_fire) {
            for (int l = 0; l < OUT_LANES; ++l) {
                uint64_t v = 0;
                for (int b = 0; b < OUT_BITS; ++b) v |= uint64_t(get_bit(top->out_tdata, l * OUT_BITS + b)) << b;
                std::fprintf(out, l + 1 < OUT_LANES ? "%llu " : "%llu\n", (unsigned long long)v);
            }
            ++got;
            last_out = cycle;
        }
        top->clk = 1;
        top->eval();
        if (in_fire) {
            if (first_in < 0) first_in = cycle;
            ++beat;
            top->in_tvalid = 0;
        }
        ++cycle;
    }
    std::fclose(out);
    top->final();
    if (got < out_beats) {
        std::fprintf(stderr, "harness: %ld of %ld output beats after %ld cycles (%ld of %ld input beats taken)\n",
                     got, out_beats, cycle, beat, n_beats);
        return 1;
    }
    std::printf("cycles %ld first_in %ld last_out %ld\n", last_out - first_in + 1, first_in, last_out);
    return 0;
}
