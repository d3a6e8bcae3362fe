// qc_dwc: AXI-stream lane width converter between two MVAUs (PE lanes of one layer -> SIMD lanes of the next).
// VEC lanes make one vector (VEC is a multiple of IN_LANES: a layer emits whole beats); a vector goes out in
// ceil(VEC/OUT_LANES) beats, the last one zero padded, so each vector starts at lane 0 of a fresh output beat.
module qc_dwc #(
    parameter int IN_LANES = 4,
    parameter int OUT_LANES = 3,
    parameter int LW = 1,
    parameter int VEC = 12
) (
    input  logic                    clk,
    input  logic                    rst_n,
    input  logic [IN_LANES*LW-1:0]  in_tdata,
    input  logic                    in_tvalid,
    output logic                    in_tready,
    output logic [OUT_LANES*LW-1:0] out_tdata,
    output logic                    out_tvalid,
    input  logic                    out_tready
);
    localparam int CAP = IN_LANES + OUT_LANES;
    localparam int TAIL = VEC - ((VEC - 1) / OUT_LANES) * OUT_LANES;  // lanes of a vector's last output beat
    localparam int C_W = $clog2(CAP + 1);
    localparam int R_W = $clog2(VEC + 1);

    logic [CAP*LW-1:0] buffer;   // lanes [0, count) hold data, the rest are zero
    logic [C_W-1:0]    count;
    logic [R_W-1:0]    remaining;  // lanes of the current vector still to send
    logic              last_beat;
    logic [C_W-1:0]    take;
    logic [OUT_LANES*LW-1:0] tail_mask;

    assign last_beat = (remaining <= R_W'(OUT_LANES));
    assign take = last_beat ? C_W'(TAIL) : C_W'(OUT_LANES);
    for (genvar i = 0; i < OUT_LANES; i++) begin : g_mask
        assign tail_mask[i*LW +: LW] = (i < TAIL) ? {LW{1'b1}} : {LW{1'b0}};
    end
    assign out_tvalid = (count >= take);
    assign out_tdata = last_beat ? (buffer[OUT_LANES*LW-1:0] & tail_mask) : buffer[OUT_LANES*LW-1:0];
    assign in_tready = (count <= C_W'(CAP - IN_LANES));

    logic in_fire, out_fire;
    logic [C_W-1:0] kept;
    logic [CAP*LW-1:0] shifted;
    assign in_fire = in_tvalid && in_tready;
    assign out_fire = out_tvalid && out_tready;
    assign kept = out_fire ? count - take : count;
    assign shifted = out_fire ? (last_beat ? buffer >> (TAIL * LW) : buffer >> (OUT_LANES * LW)) : buffer;

    always_ff @(posedge clk) begin
        if (!rst_n) begin
            buffer <= '0;
            count <= '0;
            remaining <= R_W'(VEC);
        end else begin
            buffer <= in_fire ? (shifted | ((CAP*LW)'(in_tdata) << (32'(kept) * LW))) : shifted;
            count <= in_fire ? kept + C_W'(IN_LANES) : kept;
            if (out_fire) remaining <= last_beat ? R_W'(VEC) : remaining - R_W'(OUT_LANES);
        end
    end
endmodule
