// The pad wrapper: the macro port on one side, the chip's pins on the other. THIS is the file a chip team replaces.
//
// This reference wrapper has no chip behind it ("no chip attached"): it keeps the SRAM rows in block RAM, so
// weights written read back, and answers every conversion after CONV_CYCLES cycles with all codes 0. It lets a
// PYNQ board run the whole stack (cimlab board serve, cimlab check's hello/registers/weights steps) before a chip
// is wired. A chip's wrapper drives the chip's word lines, ADC start and SRAM port from these signals, registers
// what comes back, and raises m_adc_done when every column's code is in m_adc_code (the sequencer waits for it, so
// a serial readout may take as long as it needs). See bitstreams/README.md for the port and its timing.
`default_nettype none
module cimlab_pads #(
  parameter integer ROWS = 1,
  parameter integer N_SLICES = 1,
  parameter integer COLS = 1,
  parameter integer CELL_BITS = 1,
  parameter integer ADC_BITS = 1,
  parameter integer N_PLANES = 1,
  parameter integer N_GROUPS = 1,
  parameter integer ROWS_PER_CONV = 1,
  parameter integer SLICE_BITS = 1,
  parameter integer CONV_CYCLES = 2
) (
  input  wire                                 clk,
  input  wire [15:0]                          m_sram_addr,
  input  wire                                 m_sram_we,
  input  wire [N_SLICES*COLS*CELL_BITS-1:0]   m_sram_wdata,
  input  wire                                 m_sram_re,
  output reg  [N_SLICES*COLS*CELL_BITS-1:0]   m_sram_rdata,
  input  wire                                 m_wl_pulse,
  input  wire [$clog2(N_PLANES+1)-1:0]        m_wl_plane,
  input  wire [$clog2(N_GROUPS+1)-1:0]        m_grp,
  input  wire [ROWS_PER_CONV*SLICE_BITS-1:0]  m_wl_data,
  input  wire                                 m_adc_start,
  output wire                                 m_adc_done,
  output wire [N_SLICES*COLS*ADC_BITS-1:0]    m_adc_code,
  input  wire [15:0]                          m_vdd_mv,
  input  wire [31:0]                          m_temp_cc
);
  // SRAM: the sequencer holds m_sram_re for read_row_cycles (>= 2 on a board: block RAM reads are registered)
  reg [N_SLICES*COLS*CELL_BITS-1:0] rows [0:ROWS-1];
  always @(posedge clk) begin
    if (m_sram_we) rows[m_sram_addr] <= m_sram_wdata;
    m_sram_rdata <= rows[m_sram_addr];
  end

  // ADC: done CONV_CYCLES cycles after start, counted inclusively; no chip, so every code is 0
  reg [15:0] remaining = 16'd0;
  always @(posedge clk)
    if (m_adc_start) remaining <= CONV_CYCLES - 1;
    else if (remaining != 0) remaining <= remaining - 1;
  assign m_adc_done = (remaining == 1);
  assign m_adc_code = {(N_SLICES*COLS*ADC_BITS){1'b0}};
endmodule
`default_nettype wire
