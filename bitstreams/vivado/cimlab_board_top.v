// The block design's view of the controller (Vivado module reference: plain Verilog at the top). AXI4-Lite slave
// "s_axi" on aclk/aresetn, the done interrupt, and the macro port wired to the pad wrapper. The parameters come
// from params.tcl, written by scripts/build_overlay.py from a twin profile (cimlab.chip_sim.rtl.rtl_parameters).
`default_nettype none
module cimlab_board_top #(
  parameter integer ROWS = 1, parameter integer COLS = 1, parameter integer WEIGHT_BITS = 2,
  parameter integer WEIGHT_STORAGE = 0, parameter integer CELL_BITS = 1, parameter integer INPUT_BITS = 1,
  parameter integer SLICE_BITS = 1, parameter integer ROWS_PER_CONV = 1, parameter integer ADC_BITS = 1,
  parameter integer ADC_FULL_SCALE = 1, parameter integer CLOCK_HZ = 1, parameter integer N_GROUPS = 1,
  parameter integer N_SLICES = 1, parameter integer N_PLANES = 1, parameter integer BUS_BITS = 64,
  parameter integer IN_WORDS = 2, parameter integer OUT_WORDS = 2, parameter integer GROUP_WORDS = 1,
  parameter integer ROW_WORDS = 1, parameter integer MAC_WORDS = 1, parameter integer CONV_WORDS = 1,
  parameter integer CODE_BITS = 8, parameter integer T_OVH = 0, parameter integer T_WL = 1,
  parameter integer T_WR = 1, parameter integer T_RD = 2, parameter integer CONV_CYCLES = 2,
  parameter [31:0] VDD_NOMINAL_MV = 0, parameter [31:0] VDD_MIN_MV = 0, parameter [31:0] VDD_MAX_MV = 0,
  parameter [31:0] TEMP_NOMINAL_CC = 0, parameter [31:0] TEMP_MIN_CC = 0, parameter [31:0] TEMP_MAX_CC = 0,
  parameter [31:0] BUILD_ID = 0
) (
  input  wire        aclk,
  input  wire        aresetn,
  input  wire [19:0] s_axi_awaddr,
  input  wire [2:0]  s_axi_awprot,
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
  input  wire [2:0]  s_axi_arprot,
  input  wire        s_axi_arvalid,
  output wire        s_axi_arready,
  output wire [31:0] s_axi_rdata,
  output wire [1:0]  s_axi_rresp,
  output wire        s_axi_rvalid,
  input  wire        s_axi_rready,
  output wire        irq
);
  localparam integer J = N_SLICES * COLS;
  wire [15:0] m_sram_addr, m_vdd_mv;
  wire [31:0] m_temp_cc;
  wire m_sram_we, m_sram_re, m_wl_pulse, m_adc_start, m_adc_done;
  wire [J*CELL_BITS-1:0] m_sram_wdata, m_sram_rdata;
  wire [$clog2(N_PLANES+1)-1:0] m_wl_plane;
  wire [$clog2(N_GROUPS+1)-1:0] m_grp;
  wire [ROWS_PER_CONV*SLICE_BITS-1:0] m_wl_data;
  wire [J*ADC_BITS-1:0] m_adc_code;

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
    .s_axi_awaddr(s_axi_awaddr), .s_axi_awprot(s_axi_awprot), .s_axi_awvalid(s_axi_awvalid),
    .s_axi_awready(s_axi_awready), .s_axi_wdata(s_axi_wdata), .s_axi_wstrb(s_axi_wstrb),
    .s_axi_wvalid(s_axi_wvalid), .s_axi_wready(s_axi_wready), .s_axi_bresp(s_axi_bresp),
    .s_axi_bvalid(s_axi_bvalid), .s_axi_bready(s_axi_bready), .s_axi_araddr(s_axi_araddr),
    .s_axi_arprot(s_axi_arprot), .s_axi_arvalid(s_axi_arvalid), .s_axi_arready(s_axi_arready),
    .s_axi_rdata(s_axi_rdata), .s_axi_rresp(s_axi_rresp), .s_axi_rvalid(s_axi_rvalid),
    .s_axi_rready(s_axi_rready), .irq(irq),
    .m_sram_addr(m_sram_addr), .m_sram_we(m_sram_we), .m_sram_wdata(m_sram_wdata), .m_sram_re(m_sram_re),
    .m_sram_rdata(m_sram_rdata), .m_wl_pulse(m_wl_pulse), .m_wl_plane(m_wl_plane), .m_grp(m_grp),
    .m_wl_data(m_wl_data), .m_adc_start(m_adc_start), .m_adc_done(m_adc_done), .m_adc_code(m_adc_code),
    .m_vdd_mv(m_vdd_mv), .m_temp_cc(m_temp_cc)
  );

  cimlab_pads #(
    .ROWS(ROWS), .N_SLICES(N_SLICES), .COLS(COLS), .CELL_BITS(CELL_BITS), .ADC_BITS(ADC_BITS),
    .N_PLANES(N_PLANES), .N_GROUPS(N_GROUPS), .ROWS_PER_CONV(ROWS_PER_CONV), .SLICE_BITS(SLICE_BITS),
    .CONV_CYCLES(CONV_CYCLES)
  ) u_pads (
    .clk(aclk), .m_sram_addr(m_sram_addr), .m_sram_we(m_sram_we), .m_sram_wdata(m_sram_wdata),
    .m_sram_re(m_sram_re), .m_sram_rdata(m_sram_rdata), .m_wl_pulse(m_wl_pulse), .m_wl_plane(m_wl_plane),
    .m_grp(m_grp), .m_wl_data(m_wl_data), .m_adc_start(m_adc_start), .m_adc_done(m_adc_done),
    .m_adc_code(m_adc_code), .m_vdd_mv(m_vdd_mv), .m_temp_cc(m_temp_cc)
  );
endmodule
`default_nettype wire
