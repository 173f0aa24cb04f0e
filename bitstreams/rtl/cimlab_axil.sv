// AXI4-Lite slave -> a simple register/memory bus: one write and one read in flight, one-cycle read latency.
//
// A write completes when both its address (AW) and data (W) have arrived, in either order: `wr_en` pulses for one
// cycle and the response (B, always OKAY) follows. A read issues `rd_en` on the AR handshake; the addressed block
// answers on `rd_data` in the next cycle and keeps it until its next `rd_en`, which cannot come before RREADY.
`default_nettype none
module cimlab_axil #(
  parameter integer ADDR_BITS = 20
) (
  input  wire                 aclk,
  input  wire                 rst,
  input  wire [ADDR_BITS-1:0] s_axi_awaddr,
  input  wire                 s_axi_awvalid,
  output wire                 s_axi_awready,
  input  wire [31:0]          s_axi_wdata,
  input  wire [3:0]           s_axi_wstrb,
  input  wire                 s_axi_wvalid,
  output wire                 s_axi_wready,
  output wire [1:0]           s_axi_bresp,
  output reg                  s_axi_bvalid,
  input  wire                 s_axi_bready,
  input  wire [ADDR_BITS-1:0] s_axi_araddr,
  input  wire                 s_axi_arvalid,
  output wire                 s_axi_arready,
  output wire [31:0]          s_axi_rdata,
  output wire [1:0]           s_axi_rresp,
  output reg                  s_axi_rvalid,
  input  wire                 s_axi_rready,
  output wire                 wr_en,
  output reg  [ADDR_BITS-1:0] wr_addr,
  output reg  [31:0]          wr_data,
  output reg  [3:0]           wr_strb,
  output wire                 rd_en,
  output wire [ADDR_BITS-1:0] rd_addr,
  input  wire [31:0]          rd_data
);
  // power-up values (FPGA registers have them) keep the handshakes defined before the first reset
  reg aw_held, w_held, r_wait;
  initial begin
    aw_held = 1'b0;
    w_held = 1'b0;
    r_wait = 1'b0;
    s_axi_bvalid = 1'b0;
    s_axi_rvalid = 1'b0;
  end
  assign s_axi_awready = !aw_held;
  assign s_axi_wready  = !w_held;
  assign s_axi_bresp   = 2'b00;
  assign wr_en = aw_held && w_held && !s_axi_bvalid;

  always @(posedge aclk) begin
    if (rst) begin
      aw_held <= 1'b0;
      w_held <= 1'b0;
      s_axi_bvalid <= 1'b0;
    end else begin
      if (s_axi_awvalid && s_axi_awready) begin
        aw_held <= 1'b1;
        wr_addr <= s_axi_awaddr;
      end
      if (s_axi_wvalid && s_axi_wready) begin
        w_held <= 1'b1;
        wr_data <= s_axi_wdata;
        wr_strb <= s_axi_wstrb;
      end
      if (wr_en) begin
        aw_held <= 1'b0;
        w_held <= 1'b0;
        s_axi_bvalid <= 1'b1;
      end else if (s_axi_bvalid && s_axi_bready) begin
        s_axi_bvalid <= 1'b0;
      end
    end
  end

  assign s_axi_arready = !r_wait && !s_axi_rvalid;
  assign rd_en   = s_axi_arvalid && s_axi_arready;
  assign rd_addr = s_axi_araddr;
  assign s_axi_rdata = rd_data;
  assign s_axi_rresp = 2'b00;

  always @(posedge aclk) begin
    if (rst) begin
      r_wait <= 1'b0;
      s_axi_rvalid <= 1'b0;
    end else begin
      r_wait <= rd_en;
      if (r_wait) s_axi_rvalid <= 1'b1;
      else if (s_axi_rvalid && s_axi_rready) s_axi_rvalid <= 1'b0;
    end
  end
endmodule
`default_nettype wire
