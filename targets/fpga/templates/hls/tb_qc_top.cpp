// qcompile C simulation testbench: streams every frame of input.txt through qc_top and compares the output words
// with expected.txt value by value (codes, int32 two's complement or float32 bit patterns, all as uint32).
// Files: a first line "frames values", then one line of values per frame (stream order, channels innermost).
// Usage: tb_qc_top input.txt expected.txt [output.txt]; exit status 0 when every value matches.
#include <cstdio>
#include <cstdlib>
#include <vector>
#include "qc_top.h"

static bool read_values(const char *path, long &frames, long &count, std::vector<unsigned long> &v) {
    FILE *f = std::fopen(path, "r");
    if (!f) return false;
    if (std::fscanf(f, "%ld %ld", &frames, &count) != 2) { std::fclose(f); return false; }
    v.resize((size_t)(frames * count));
    for (size_t i = 0; i < v.size(); i++)
        if (std::fscanf(f, "%lu", &v[i]) != 1) { std::fclose(f); return false; }
    std::fclose(f);
    return true;
}

int main(int argc, char **argv) {
    if (argc < 3) { std::fprintf(stderr, "usage: %s input.txt expected.txt [output.txt]\n", argv[0]); return 2; }
    long frames = 0, n_in = 0, frames_out = 0, n_out = 0;
    std::vector<unsigned long> x, want;
    if (!read_values(argv[1], frames, n_in, x) || !read_values(argv[2], frames_out, n_out, want)) {
        std::fprintf(stderr, "cannot read %s or %s\n", argv[1], argv[2]);
        return 2;
    }
    if (frames != frames_out || n_in != (long)QC_IN_WORDS * QC_IN_LANES || n_out != (long)QC_OUT_WORDS * QC_OUT_LANES) {
        std::fprintf(stderr, "vector files do not match the design (%ld x %ld in, %ld x %ld out)\n", frames, n_in,
                     frames_out, n_out);
        return 2;
    }
    FILE *log = argc > 3 ? std::fopen(argv[3], "w") : NULL;
    if (log) std::fprintf(log, "%ld %ld\n", frames, n_out);
    long mismatches = 0;
    for (long f = 0; f < frames; f++) {
        hls::stream<qc_in_t> in("tb_in");
        hls::stream<qc_out_t> out("tb_out");
        for (long w = 0; w < QC_IN_WORDS; w++) {
            qc_in_t word = 0;
            for (int l = 0; l < QC_IN_LANES; l++)
                word.range(l * QC_IN_BITS + QC_IN_BITS - 1, l * QC_IN_BITS) = x[f * n_in + w * QC_IN_LANES + l];
            in.write(word);
        }
        qc_top(in, out);
        if ((long)out.size() != QC_OUT_WORDS || !in.empty()) {
            std::fprintf(stderr, "frame %ld: %ld output words (want %d), %ld input words left\n", f,
                         (long)out.size(), QC_OUT_WORDS, (long)in.size());
            return 1;
        }
        for (long w = 0; w < QC_OUT_WORDS; w++) {
            qc_out_t word = out.read();
            for (int l = 0; l < QC_OUT_LANES; l++) {
                unsigned long got = (unsigned long)word.range(l * QC_OUT_BITS + QC_OUT_BITS - 1, l * QC_OUT_BITS).to_uint64();
                long i = w * QC_OUT_LANES + l;
                if (log) std::fprintf(log, "%lu%c", got, i == n_out - 1 ? '\n' : ' ');
                if (got != want[f * n_out + i] && mismatches++ < 10)
                    std::fprintf(stderr, "frame %ld value %ld: got %lu, want %lu\n", f, i, got, want[f * n_out + i]);
            }
        }
    }
    if (log) std::fclose(log);
    std::printf("%s: %ld frames, %ld mismatches\n", mismatches ? "FAIL" : "PASS", frames, mismatches);
    return mismatches ? 1 : 0;
}
