// Place-and-route wrapper for timing only (scripts/synth.py): the controller with its AXI4-Lite port on pins and its
// macro port folded inside the FPGA, since no FPGA package has pins for a macro port of thousands of bits. The
// macro's inputs come from a free-running LFSR and its outputs are XOR-folded into one registered pin, so neither
// side can be optimized away and every path from and to the macro port is timed register to register.
`default_nettype none
module cimlab_fmax_top #(
  parameter integer ROWS = 1,
  parameter integer COLS = 1,
  parameter integer WEIGHT_BITS = 2,
  parameter integer WEIGHT_STORAGE = 0,
  parameter integer CELL_BITS = 1,
  parameter integer INPUT_BITS = 1,
  parameter integer SLICE_BITS = 1,
  parameter integer ROWS_PER_CONV = 1,
  parameter integer ADC_BITS = 1,
  parameter integer ADC_FULL_SCALE = 1,
  parameter integer CLOCK_HZ = 1,
  parameter integer N_GROUPS = 1,
  parameter integer N_SLICES = 1,
  parameter integer N_PLANES = 1,
  parameter integer BUS_BITS = 64,
  parameter integer IN_WORDS = 2,
  parameter integer OUT_WORDS = 2,
  parameter integer GROUP_WORDS = 1,
  parameter integer ROW_WORDS = 1,
  parameter integer MAC_WORDS = 1,
  parameter integer CONV_WORDS = 1,
  parameter integer CODE_BITS = 8,
  parameter integer T_OVH = 0,
  parameter integer T_WL = 1,
  parameter integer T_WR = 1,
  parameter integer T_RD = 1,
  parameter [31:0] VDD_NOMINAL_MV = 0,
  parameter [31:0] VDD_MIN_MV = 0,
  parameter [31:0] VDD_MAX_MV = 0,
  parameter [31:0] TEMP_NOMINAL_CC = 0,
  parameter [31:0] TEMP_MIN_CC = 0,
  parameter [31:0] TEMP_MAX_CC = 0,
  parameter [31:0] BUILD_ID = 0
) (
  input  wire        aclk,
  input  wire        aresetn,
  input  wire [19:0] s_axi_awaddr,
  input  wire        s_axi_awvalid,
  output wire        s_axi_awready,
  input  wire [31:0] s_axi_wdata,
  input  wire [3:0]  s_axi_wstrb,
  input  wire        s_axi_wvalid,
  output wire        s_axi_wready,
  output wire [1:0]  s_axi_bresp,
  output wire        s_axi_bvalid,
  input  wire        s_axi_bready,
  input  wire [19:0] s_axi_araddr,
  input  wire        s_axi_arvalid,
  output wire        s_axi_arready,
  output wire [31:0] s_axi_rdata,
  output wire [1:0]  s_axi_rresp,
  output wire        s_axi_rvalid,
  input  wire        s_axi_rready,
  output wire        irq,
  output reg         macro_fold
);
  localparam integer J = N_SLICES * COLS;
  localparam integer IN_BITS = J * CELL_BITS + 1 + J * ADC_BITS;
  localparam integer OUT_BITS = 16 + 1 + J * CELL_BITS + 1 + 1 + $clog2(N_PLANES + 1) + $clog2(N_GROUPS + 1)
                                + ROWS_PER_CONV * SLICE_BITS + 1 + 16 + 32;

  // the macro's inputs: a 64-bit LFSR, its bits reused across the port
  reg [63:0] lfsr;
  always @(posedge aclk) lfsr <= aresetn ? {lfsr[62:0], lfsr[63] ^ lfsr[62] ^ lfsr[60] ^ lfsr[59]} : 64'h1;
  reg [IN_BITS-1:0] macro_in;
  integer i;
  always @(posedge aclk)
    for (i = 0; i < IN_BITS; i = i + 1) macro_in[i] <= lfsr[(i * 7) % 64];

  wire [OUT_BITS-1:0] macro_out;
  cimlab_ctrl #(
    .ROWS(ROWS), .COLS(COLS), .WEIGHT_BITS(WEIGHT_BITS), .WEIGHT_STORAGE(WEIGHT_STORAGE), .CELL_BITS(CELL_BITS),
    .INPUT_BITS(INPUT_BITS), .SLICE_BITS(SLICE_BITS), .ROWS_PER_CONV(ROWS_PER_CONV), .ADC_BITS(ADC_BITS),
    .ADC_FULL_SCALE(ADC_FULL_SCALE), .CLOCK_HZ(CLOCK_HZ), .N_GROUPS(N_GROUPS), .N_SLICES(N_SLICES),
    .N_PLANES(N_PLANES), .BUS_BITS(BUS_BITS), .IN_WORDS(IN_WORDS), .OUT_WORDS(OUT_WORDS),
    .GROUP_WORDS(GROUP_WORDS), .ROW_WORDS(ROW_WORDS), .MAC_WORDS(MAC_WORDS), .CONV_WORDS(CONV_WORDS),
    .CODE_BITS(CODE_BITS), .T_OVH(T_OVH), .T_WL(T_WL), .T_WR(T_WR), .T_RD(T_RD),
    .VDD_NOMINAL_MV(VDD_NOMINAL_MV), .VDD_MIN_MV(VDD_MIN_MV), .VDD_MAX_MV(VDD_MAX_MV),
    .TEMP_NOMINAL_CC(TEMP_NOMINAL_CC), .TEMP_MIN_CC(TEMP_MIN_CC), .TEMP_MAX_CC(TEMP_MAX_CC), .BUILD_ID(BUILD_ID)
  ) u_ctrl (
    .aclk(aclk), .aresetn(aresetn),
    .s_axi_awaddr(s_axi_awaddr), .s_axi_awprot(3'd0), .s_axi_awvalid(s_axi_awvalid), .s_axi_awready(s_axi_awready),
    .s_axi_wdata(s_axi_wdata), .s_axi_wstrb(s_axi_wstrb), .s_axi_wvalid(s_axi_wvalid), .s_axi_wready(s_axi_wready),
    .s_axi_bresp(s_axi_bresp), .s_axi_bvalid(s_axi_bvalid), .s_axi_bready(s_axi_bready),
    .s_axi_araddr(s_axi_araddr), .s_axi_arprot(3'd0), .s_axi_arvalid(s_axi_arvalid), .s_axi_arready(s_axi_arready),
    .s_axi_rdata(s_axi_rdata), .s_axi_rresp(s_axi_rresp), .s_axi_rvalid(s_axi_rvalid), .s_axi_rready(s_axi_rready),
    .irq(irq),
    .m_sram_rdata(macro_in[J*CELL_BITS-1:0]), .m_adc_done(macro_in[J*CELL_BITS]),
    .m_adc_code(macro_in[J*CELL_BITS+1 +: J*ADC_BITS]),
    .m_sram_addr(macro_out[15:0]), .m_sram_we(macro_out[16]), .m_sram_wdata(macro_out[17 +: J*CELL_BITS]),
    .m_sram_re(macro_out[17 + J*CELL_BITS]), .m_wl_pulse(macro_out[18 + J*CELL_BITS]),
    .m_wl_plane(macro_out[19 + J*CELL_BITS +: $clog2(N_PLANES + 1)]),
    .m_grp(macro_out[19 + J*CELL_BITS + $clog2(N_PLANES + 1) +: $clog2(N_GROUPS + 1)]),
    .m_wl_data(macro_out[19 + J*CELL_BITS + $clog2(N_PLANES + 1) + $clog2(N_GROUPS + 1) +: ROWS_PER_CONV*SLICE_BITS]),
    .m_adc_start(macro_out[OUT_BITS - 49]), .m_vdd_mv(macro_out[OUT_BITS - 48 +: 16]),
    .m_temp_cc(macro_out[OUT_BITS - 32 +: 32])
  );
  reg [OUT_BITS-1:0] macro_out_q;  // registered first, so the fold is a path of its own
  always @(posedge aclk) begin
    macro_out_q <= macro_out;
    macro_fold <= ^macro_out_q;
  end
endmodule
`default_nettype wire
