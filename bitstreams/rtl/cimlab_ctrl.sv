// The cimlab reference controller: an AXI4-Lite slave (registers generated from firmware_bridge/registers.py, and
// two block-RAM buffers), counters, and the sequencer that drives the macro port. See bitstreams/README.md for the
// address map, the macro port and its timing diagram. All parameters come from cimlab.chip_sim.rtl.parameters.
`default_nettype none
module cimlab_ctrl #(
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
  input  wire                 aclk,
  input  wire                 aresetn,
  input  wire [19:0] s_axi_awaddr,
  input  wire [2:0]           s_axi_awprot,
  input  wire                 s_axi_awvalid,
  output wire                 s_axi_awready,
  input  wire [31:0]          s_axi_wdata,
  input  wire [3:0]           s_axi_wstrb,
  input  wire                 s_axi_wvalid,
  output wire                 s_axi_wready,
  output wire [1:0]           s_axi_bresp,
  output wire                 s_axi_bvalid,
  input  wire                 s_axi_bready,
  input  wire [19:0] s_axi_araddr,
  input  wire [2:0]           s_axi_arprot,
  input  wire                 s_axi_arvalid,
  output wire                 s_axi_arready,
  output wire [31:0]          s_axi_rdata,
  output wire [1:0]           s_axi_rresp,
  output wire                 s_axi_rvalid,
  input  wire                 s_axi_rready,
  output wire                 irq,
  // ---- the macro port (see bitstreams/README.md) ----
  output wire [15:0]          m_sram_addr,
  output wire                 m_sram_we,
  output wire [N_SLICES*COLS*CELL_BITS-1:0] m_sram_wdata,
  output wire                 m_sram_re,
  input  wire [N_SLICES*COLS*CELL_BITS-1:0] m_sram_rdata,
  output wire                 m_wl_pulse,
  output wire [$clog2(N_PLANES+1)-1:0] m_wl_plane,
  output wire [$clog2(N_GROUPS+1)-1:0] m_grp,
  output wire [ROWS_PER_CONV*SLICE_BITS-1:0] m_wl_data,
  output wire                 m_adc_start,
  input  wire                 m_adc_done,
  input  wire [N_SLICES*COLS*ADC_BITS-1:0] m_adc_code,
  output wire [15:0]          m_vdd_mv,
  output wire [31:0]          m_temp_cc,
  output wire [31:0]          m_noise_seed,
  output wire                 m_noise_seed_wr
);
  localparam integer ADDR_BITS = 20;
  localparam integer J = N_SLICES * COLS;
  localparam integer LANE_BITS = $clog2(BUS_BITS / 32);
  localparam integer IN_AW = $clog2(IN_WORDS);
  localparam integer OUT_AW = $clog2(OUT_WORDS);

  // ---- reset: the AXI reset, or SOFT_RESET (bit 0) for one cycle ------------------------------------------------
  wire soft_reset_stb;
  wire [31:0] soft_reset_data;
  reg  soft_reset_q;
  always @(posedge aclk) soft_reset_q <= aresetn && soft_reset_stb && soft_reset_data[0];
  wire rst = !aresetn || soft_reset_q;

  // ---- AXI4-Lite to the register bus and the buffers ------------------------------------------------------------
  wire wr_en, rd_en;
  wire [19:0] wr_addr, rd_addr;
  wire [31:0] wr_data;
  wire [3:0] wr_strb;
  reg  [31:0] rd_data;
  cimlab_axil #(.ADDR_BITS(ADDR_BITS)) u_axil (
    .aclk(aclk), .rst(!aresetn),
    .s_axi_awaddr(s_axi_awaddr), .s_axi_awvalid(s_axi_awvalid), .s_axi_awready(s_axi_awready),
    .s_axi_wdata(s_axi_wdata), .s_axi_wstrb(s_axi_wstrb), .s_axi_wvalid(s_axi_wvalid), .s_axi_wready(s_axi_wready),
    .s_axi_bresp(s_axi_bresp), .s_axi_bvalid(s_axi_bvalid), .s_axi_bready(s_axi_bready),
    .s_axi_araddr(s_axi_araddr), .s_axi_arvalid(s_axi_arvalid), .s_axi_arready(s_axi_arready),
    .s_axi_rdata(s_axi_rdata), .s_axi_rresp(s_axi_rresp), .s_axi_rvalid(s_axi_rvalid), .s_axi_rready(s_axi_rready),
    .wr_en(wr_en), .wr_addr(wr_addr), .wr_data(wr_data), .wr_strb(wr_strb),
    .rd_en(rd_en), .rd_addr(rd_addr), .rd_data(rd_data)
  );

  // regions: 0x00000 registers, 0x40000 input buffer, 0x80000 output buffer (bits 19:18)
  wire wr_regs = wr_en && wr_addr[19:18] == 2'd0 && wr_addr[17:12] == 0;
  wire wr_in   = wr_en && wr_addr[19:18] == 2'd1;
  wire rd_regs = rd_en && rd_addr[19:18] == 2'd0 && rd_addr[17:12] == 0;
  wire rd_out  = rd_en && rd_addr[19:18] == 2'd2;
  reg  [1:0] rd_region;
  always @(posedge aclk) if (rd_en) rd_region <= rd_regs ? 2'd0 : rd_out ? 2'd2 : 2'd3;

  // ---- sequencer, counters -------------------------------------------------------------------------------------
  wire seq_start_stb, busy, done, refused, conv_event, vector_event;
  wire [31:0] seq_start_data, seq_first_q, seq_span_q, seq_count_q;
  wire [31:0] ctrl_pulse, vdd_mv_q, temp_cc_q, err_set_data;
  wire err_set_stb;
  reg [63:0] cycles, conversions;
  reg [31:0] ops, run_cycles;
  wire clear_counters = rst || ctrl_pulse[0];
  always @(posedge aclk) begin
    if (clear_counters) begin
      cycles <= 64'd0;
      conversions <= 64'd0;
      ops <= 32'd0;
    end else begin
      cycles <= cycles + busy;
      conversions <= conversions + (conv_event ? J : 0);
      ops <= ops + vector_event;
    end
    if (rst) run_cycles <= 32'd0;
    else if (seq_start_stb && !busy) run_cycles <= 32'd0;
    else run_cycles <= run_cycles + busy;
  end
  assign irq = done;

  wire [31:0] regs_rdata, scratch_q, ctrl_q, err_flags_q;
  cimlab_regs #(
    .ADC_BITS(ADC_BITS), .ADC_FULL_SCALE(ADC_FULL_SCALE), .BUILD_ID(BUILD_ID), .BUS_BITS(BUS_BITS),
    .CELL_BITS(CELL_BITS), .CLOCK_HZ(CLOCK_HZ), .COLS(COLS), .INPUT_BITS(INPUT_BITS), .IN_WORDS(IN_WORDS),
    .OUT_WORDS(OUT_WORDS), .ROWS(ROWS), .ROWS_PER_CONV(ROWS_PER_CONV), .SLICE_BITS(SLICE_BITS),
    .TEMP_MAX_CC(TEMP_MAX_CC), .TEMP_MIN_CC(TEMP_MIN_CC), .TEMP_NOMINAL_CC(TEMP_NOMINAL_CC),
    .VDD_MAX_MV(VDD_MAX_MV), .VDD_MIN_MV(VDD_MIN_MV), .VDD_NOMINAL_MV(VDD_NOMINAL_MV),
    .WEIGHT_BITS(WEIGHT_BITS), .WEIGHT_STORAGE(WEIGHT_STORAGE)
  ) u_regs (
    .clk(aclk), .rst(rst), .por(!aresetn),
    .wr_en(wr_regs), .wr_addr(wr_addr[11:2]), .wr_data(wr_data), .wr_strb(wr_strb),
    .rd_en(rd_regs), .rd_addr(rd_addr[11:2]), .rd_data(regs_rdata),
    .scratch_q(scratch_q), .ctrl_q(ctrl_q), .ctrl_pulse(ctrl_pulse),
    .err_flags_set(err_set_stb ? err_set_data : 32'd0), .err_flags_q(err_flags_q),
    .vdd_mv_q(vdd_mv_q), .temp_cc_q(temp_cc_q), .noise_seed_q(m_noise_seed), .noise_seed_wr(m_noise_seed_wr),
    .cycles_lo_in(cycles[31:0]), .cycles_hi_in(cycles[63:32]), .ops_in(ops),
    .seq_start_stb(seq_start_stb), .seq_start_data(seq_start_data),
    .seq_status_in({29'd0, refused, done, busy}),
    .seq_first_q(seq_first_q), .seq_span_q(seq_span_q), .seq_count_q(seq_count_q),
    .soft_reset_stb(soft_reset_stb), .soft_reset_data(soft_reset_data),
    .err_set_stb(err_set_stb), .err_set_data(err_set_data),
    .conv_lo_in(conversions[31:0]), .conv_hi_in(conversions[63:32]), .run_cycles_in(run_cycles)
  );
  assign m_vdd_mv = vdd_mv_q[15:0];
  assign m_temp_cc = temp_cc_q;

  // ---- buffers ----------------------------------------------------------------------------------------------------
  wire in_re, out_we;
  wire [IN_AW-1:0] in_addr;
  wire [OUT_AW-1:0] out_addr;
  wire [BUS_BITS-1:0] in_rdata, out_wdata;
  wire [31:0] out_rdata;
  // the 32-bit lane of a bus word that a byte address falls in
  wire [LANE_BITS:0] wr_lane = (wr_addr >> 2) & ((1 << LANE_BITS) - 1);
  wire [LANE_BITS:0] rd_lane = (rd_addr >> 2) & ((1 << LANE_BITS) - 1);
  cimlab_inbuf #(.BUS_BITS(BUS_BITS), .DEPTH(IN_WORDS), .AW(IN_AW)) u_inbuf (
    .clk(aclk), .a_we(wr_in), .a_addr(wr_addr[2 + LANE_BITS +: IN_AW]), .a_lane(wr_lane),
    .a_wdata(wr_data), .b_re(in_re), .b_addr(in_addr), .b_rdata(in_rdata)
  );
  cimlab_outbuf #(.BUS_BITS(BUS_BITS), .DEPTH(OUT_WORDS), .AW(OUT_AW)) u_outbuf (
    .clk(aclk), .b_we(out_we), .b_addr(out_addr), .b_wdata(out_wdata),
    .a_re(rd_out), .a_addr(rd_addr[2 + LANE_BITS +: OUT_AW]), .a_lane(rd_lane), .a_rdata(out_rdata)
  );


  always @* begin
    case (rd_region)
      2'd0: rd_data = regs_rdata;
      2'd2: rd_data = out_rdata;
      default: rd_data = 32'd0;
    endcase
  end

  cimlab_seq #(
    .ROWS(ROWS), .COLS(COLS), .N_GROUPS(N_GROUPS), .ROWS_PER_CONV(ROWS_PER_CONV), .N_SLICES(N_SLICES),
    .CELL_BITS(CELL_BITS), .N_PLANES(N_PLANES), .SLICE_BITS(SLICE_BITS), .INPUT_BITS(INPUT_BITS),
    .ADC_BITS(ADC_BITS), .SIGNED_MSB(WEIGHT_STORAGE == 0), .BUS_BITS(BUS_BITS), .IN_WORDS(IN_WORDS),
    .OUT_WORDS(OUT_WORDS), .GROUP_WORDS(GROUP_WORDS), .ROW_WORDS(ROW_WORDS), .MAC_WORDS(MAC_WORDS),
    .CONV_WORDS(CONV_WORDS), .CODE_BITS(CODE_BITS), .T_OVH(T_OVH), .T_WL(T_WL), .T_WR(T_WR), .T_RD(T_RD)
  ) u_seq (
    .clk(aclk), .rst(rst),
    .start(seq_start_stb), .op(seq_start_data[2:0]), .first(seq_first_q), .span(seq_span_q), .count(seq_count_q),
    .busy(busy), .done(done), .refused(refused), .conv_event(conv_event), .vector_event(vector_event),
    .in_re(in_re), .in_addr(in_addr), .in_rdata(in_rdata),
    .out_we(out_we), .out_addr(out_addr), .out_wdata(out_wdata),
    .m_sram_addr(m_sram_addr), .m_sram_we(m_sram_we), .m_sram_wdata(m_sram_wdata), .m_sram_re(m_sram_re),
    .m_sram_rdata(m_sram_rdata), .m_wl_pulse(m_wl_pulse), .m_wl_plane(m_wl_plane), .m_grp(m_grp),
    .m_wl_data(m_wl_data), .m_adc_start(m_adc_start), .m_adc_done(m_adc_done), .m_adc_code(m_adc_code)
  );
endmodule
`default_nettype wire
