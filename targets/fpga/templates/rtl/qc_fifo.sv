// qc_fifo: AXI-stream FIFO between two MVAUs. It holds a whole input vector of the consumer, so the producer keeps
// going while the consumer re-reads its vector buffer (neuron folds 1 .. NF-1): FINN's StreamingFIFO.
module qc_fifo #(
    parameter int W = 8,
    parameter int DEPTH = 4   // a power of two
) (
    input  logic         clk,
    input  logic         rst_n,
    input  logic [W-1:0] in_tdata,
    input  logic         in_tvalid,
    output logic         in_tready,
    output logic [W-1:0] out_tdata,
    output logic         out_tvalid,
    input  logic         out_tready
);
    localparam int A_W = (DEPTH > 1) ? $clog2(DEPTH) : 1;
    logic [W-1:0] mem [DEPTH];
    logic [A_W-1:0] rd, wr;
    logic [A_W:0] count;
    logic push, pop;
    assign in_tready = (count != (A_W + 1)'(DEPTH));
    assign out_tvalid = (count != '0);
    assign out_tdata = mem[rd];
    assign push = in_tvalid && in_tready;
    assign pop = out_tvalid && out_tready;
    always_ff @(posedge clk) begin
        if (!rst_n) begin
            rd <= '0;
            wr <= '0;
            count <= '0;
        end else begin
            if (push) wr <= wr + 1'b1;
            if (pop) rd <= rd + 1'b1;
            count <= count + (A_W + 1)'(push) - (A_W + 1)'(pop);
        end
    end
    always_ff @(posedge clk) begin
        if (push) mem[wr] <= in_tdata;
    end
endmodule
