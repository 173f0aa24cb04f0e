// The controller's two block RAMs. Each is BUS_BITS wide on the sequencer's side and reached by the processor in
// 32-bit lanes (AXI4-Lite). Reads are registered (one cycle), as block RAM reads are.
`default_nettype none

// Input buffer: the processor writes 32-bit lanes, the sequencer reads whole words.
module cimlab_inbuf #(
  parameter integer BUS_BITS = 64,
  parameter integer DEPTH = 512,
  parameter integer AW = 9
) (
  input  wire                          clk,
  input  wire                          a_we,
  input  wire [AW-1:0]                 a_addr,
  input  wire [$clog2(BUS_BITS/32):0]  a_lane,
  input  wire [31:0]                   a_wdata,
  input  wire                          b_re,
  input  wire [AW-1:0]                 b_addr,
  output reg  [BUS_BITS-1:0]           b_rdata
);
  localparam integer LANES = BUS_BITS / 32;
  reg [BUS_BITS-1:0] mem [0:DEPTH-1];
  integer i;
  always @(posedge clk) begin  // the byte/lane-write template block RAM inference expects
    for (i = 0; i < LANES; i = i + 1)
      if (a_we && a_lane == i) mem[a_addr][i*32 +: 32] <= a_wdata;
  end
  always @(posedge clk)
    if (b_re) b_rdata <= mem[b_addr];
endmodule

// Output buffer: the sequencer writes whole words, the processor reads 32-bit lanes.
module cimlab_outbuf #(
  parameter integer BUS_BITS = 64,
  parameter integer DEPTH = 2048,
  parameter integer AW = 11
) (
  input  wire                          clk,
  input  wire                          b_we,
  input  wire [AW-1:0]                 b_addr,
  input  wire [BUS_BITS-1:0]           b_wdata,
  input  wire                          a_re,
  input  wire [AW-1:0]                 a_addr,
  input  wire [$clog2(BUS_BITS/32):0]  a_lane,
  output wire [31:0]                   a_rdata
);
  reg [BUS_BITS-1:0] mem [0:DEPTH-1];
  reg [BUS_BITS-1:0] word_q;
  reg [$clog2(BUS_BITS/32):0] lane_q;
  always @(posedge clk)
    if (b_we) mem[b_addr] <= b_wdata;
  always @(posedge clk)
    if (a_re) begin
      word_q <= mem[a_addr];
      lane_q <= a_lane;
    end
  assign a_rdata = word_q[lane_q*32 +: 32];
endmodule
`default_nettype wire
