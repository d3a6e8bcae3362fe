// qc_mvau: streaming binary matrix-vector-activation unit (1-bit weights), PE x SIMD folded, AXI-stream in and out.
// Integer contract of docs/ops.md (BitGemm): AND mode acc[n] = 2*sum_k q[n,k]*p[k] - wzero2[n]*sum_k p[k];
// XOR mode (1-bit bipolar) acc[n] = 2*popcount(XNOR(a, w)) - K. Threshold epilogue: code = #{j : acc >= T[n, j]};
// with L = 0 the output is the accumulator itself (two's complement, ACC_W bits).
// Input: one beat = SIMD codes (lane i at bits [i*BITS_A +: BITS_A]), K codes per vector in ceil(K/SIMD) beats
// (tail lanes of the last beat are ignored). Output: one beat = PE results of neurons nf*PE .. nf*PE+PE-1.
// Timing: the first neuron fold reads the stream (and fills the vector buffer), later folds re-read the buffer,
// so a vector takes N/PE * ceil(K/SIMD) cycles; a full output register stalls the whole pipeline.
module qc_mvau #(
    parameter int K = 16,
    parameter int N = 8,
    parameter int PE = 2,
    parameter int SIMD = 4,
    parameter int BITS_A = 1,
    parameter int XOR_MODE = 0,
    parameter int L = 1,
    parameter int ACC_W = 16,
    parameter int Z_W = 3,
    parameter int OUT_W = (L > 0) ? $clog2(L + 1) : ACC_W,
    parameter W_FILE = "weights.mem",
    parameter T_FILE = "thresholds.mem",
    parameter Z_FILE = "wzero2.mem"
) (
    input  logic                     clk,
    input  logic                     rst_n,
    input  logic [SIMD*BITS_A-1:0]   in_tdata,
    input  logic                     in_tvalid,
    output logic                     in_tready,
    output logic [PE*OUT_W-1:0]      out_tdata,
    output logic                     out_tvalid,
    input  logic                     out_tready
);
    localparam int NF = N / PE;
    localparam int SF = (K + SIMD - 1) / SIMD;
    localparam int WD = NF * SF;                          // weight ROM depth
    localparam int TAIL = K - (SF - 1) * SIMD;            // valid lanes in the last synapse fold
    localparam int NF_W = (NF > 1) ? $clog2(NF) : 1;
    localparam int SF_W = (SF > 1) ? $clog2(SF) : 1;
    localparam int WA_W = (WD > 1) ? $clog2(WD) : 1;
    localparam int PMAX = (1 << BITS_A) - 1;
    localparam int PS_W = $clog2(SIMD * PMAX + 1) + 1;    // one cycle's partial sum (unsigned, one spare bit)
    localparam int T_WORD = PE * ((L > 0) ? L : 1) * ACC_W;  // one unused word when L = 0

    // --- constant memories: weights [NF*SF][PE*SIMD], thresholds [NF][PE*L*ACC_W], wzero2 [NF][PE*Z_W] ---
    logic [PE*SIMD-1:0] wrom [WD];
    logic [T_WORD-1:0]  trom [NF];
    logic [PE*Z_W-1:0]  zrom [NF];
    initial begin
        $readmemh(W_FILE, wrom);
        if (L > 0) $readmemh(T_FILE, trom);
        if (XOR_MODE == 0) $readmemh(Z_FILE, zrom);
    end

    // one enable for the whole pipeline: it advances unless a full output register is not taken
    logic en;
    assign en = !out_tvalid || out_tready;

    // --- stage 0: issue one (neuron fold, synapse fold) per cycle ---
    logic [NF_W-1:0] nf;
    logic [SF_W-1:0] sf;
    logic [WA_W-1:0] waddr;
    logic [SIMD*BITS_A-1:0] vbuf [SF];                     // the current vector, for folds 1 .. NF-1
    logic first_fold, issue;
    assign first_fold = (nf == '0);
    assign in_tready = en && first_fold;
    assign issue = en && (!first_fold || in_tvalid);

    logic [SIMD*BITS_A-1:0] act_in;
    assign act_in = first_fold ? in_tdata : vbuf[sf];

    logic [SIMD*BITS_A-1:0] s1_act;
    logic [PE*SIMD-1:0]     s1_w;
    logic                   s1_valid, s1_first, s1_last;
    logic [NF_W-1:0]        s1_nf;

    // tail lanes of the last synapse fold are zeroed: they add nothing in either mode (see stage 1)
    logic [SIMD*BITS_A-1:0] tail_mask;
    for (genvar i = 0; i < SIMD; i++) begin : g_tail
        assign tail_mask[i*BITS_A +: BITS_A] = (i < TAIL) ? {BITS_A{1'b1}} : {BITS_A{1'b0}};
    end

    always_ff @(posedge clk) begin
        if (!rst_n) begin
            nf <= '0;
            sf <= '0;
            waddr <= '0;
            s1_valid <= 1'b0;
        end else if (en) begin
            s1_valid <= issue;
            if (issue) begin
                sf <= (sf == SF_W'(SF - 1)) ? '0 : sf + 1'b1;
                if (sf == SF_W'(SF - 1)) nf <= (nf == NF_W'(NF - 1)) ? '0 : nf + 1'b1;
                waddr <= (waddr == WA_W'(WD - 1)) ? '0 : waddr + 1'b1;
            end
        end
    end

    always_ff @(posedge clk) begin
        if (en && issue) begin
            if (first_fold) vbuf[sf] <= in_tdata;
            s1_act <= (sf == SF_W'(SF - 1)) ? (act_in & tail_mask) : act_in;
            s1_w <= wrom[waddr];
            s1_first <= (sf == '0);
            s1_last <= (sf == SF_W'(SF - 1));
            s1_nf <= nf;
        end
    end

    // --- stage 1: per PE popcount / adder tree of SIMD lanes, accumulated over the synapse folds ---
    logic [PS_W-1:0] part [PE];
    logic [PS_W-1:0] part_p;                                // sum of the codes (AND mode's wzero2 term)
    always_comb begin
        part_p = '0;
        for (int i = 0; i < SIMD; i++) part_p = part_p + PS_W'(s1_act[i*BITS_A +: BITS_A]);
        for (int pe = 0; pe < PE; pe++) begin
            part[pe] = '0;
            for (int i = 0; i < SIMD; i++) begin
                if (XOR_MODE != 0)
                    // a masked tail lane has a = 0; it must add nothing, so XNOR counts only live lanes
                    part[pe] = part[pe] + PS_W'(!(s1_act[i] ^ s1_w[pe*SIMD + i]) &&
                                                 (!s1_last || i < TAIL));
                else
                    part[pe] = part[pe] + (s1_w[pe*SIMD + i] ? PS_W'(s1_act[i*BITS_A +: BITS_A]) : '0);
            end
        end
    end

    logic signed [ACC_W-1:0] acc [PE];
    logic signed [ACC_W-1:0] acc_p;
    logic                    s2_valid;
    logic [NF_W-1:0]         s2_nf;
    always_ff @(posedge clk) begin
        if (!rst_n) s2_valid <= 1'b0;
        else if (en) s2_valid <= s1_valid && s1_last;
    end
    always_ff @(posedge clk) begin
        if (en && s1_valid) begin
            for (int pe = 0; pe < PE; pe++)
                acc[pe] <= (s1_first ? '0 : acc[pe]) + ACC_W'(part[pe]);
            acc_p <= (s1_first ? '0 : acc_p) + ACC_W'(part_p);
            s2_nf <= s1_nf;
        end
    end

    // --- stage 2: accumulator -> integer value -> threshold code (or the value itself) into the output register ---
    logic [T_WORD-1:0]  t_word;
    logic [PE*Z_W-1:0]  z_word;
    assign t_word = trom[s2_nf];
    assign z_word = zrom[s2_nf];

    logic [PE*OUT_W-1:0] result;
    always_comb begin
        for (int pe = 0; pe < PE; pe++) begin
            logic signed [ACC_W-1:0] value;
            logic [OUT_W-1:0] code;
            if (XOR_MODE != 0)
                value = (acc[pe] <<< 1) - ACC_W'(K);
            else begin
                // wzero2 * sum(p) as shift-and-add of its Z_W two's complement bits (no DSP for a 2-3 bit factor)
                value = acc[pe] <<< 1;
                for (int b = 0; b < Z_W; b++)
                    if (z_word[pe*Z_W + b]) value = (b == Z_W - 1) ? value + (acc_p <<< b) : value - (acc_p <<< b);
            end
            if (L > 0) begin
                code = '0;
                for (int j = 0; j < L; j++)
                    code = code + OUT_W'(value >= $signed(t_word[(pe*L + j)*ACC_W +: ACC_W]));
            end else begin
                code = OUT_W'(value);
            end
            result[pe*OUT_W +: OUT_W] = code;
        end
    end

    always_ff @(posedge clk) begin
        if (!rst_n) out_tvalid <= 1'b0;
        else if (en) out_tvalid <= s2_valid;
    end
    always_ff @(posedge clk) begin
        if (en && s2_valid) out_tdata <= result;
    end
endmodule
