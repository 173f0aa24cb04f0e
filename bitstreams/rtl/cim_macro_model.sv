// A behavioural model of a CIM macro behind the macro port: for simulation only (not synthesizable as a macro).
//
// Digital behaviour: the SRAM (write on every cycle m_sram_we is high, combinational read), and the ADC handshake:
// m_adc_done comes ADC_CYCLES cycles after m_adc_start counted inclusively (at least 2: done is registered), with
// the codes valid while it is high.
// Test hooks: `adc_extra` lengthens this conversion (conversion times that vary), `adc_stall` holds it (a hung
// macro: the sequencer stays busy until SOFT_RESET).
// Analog behaviour: the codes are `ext_code`, driven by the twin's converter (cimlab.chip_sim.rtl.macro) as each
// conversion starts; it reads m_grp, m_wl_plane, m_wl_data and the condition outputs, and mirrors SRAM writes.
// A chip team replaces this module by its pad wrapper (bitstreams/README.md).
`default_nettype none
module cim_macro_model #(
  parameter integer ROWS = 1,
  parameter integer N_SLICES = 1,
  parameter integer COLS = 1,
  parameter integer CELL_BITS = 1,
  parameter integer ADC_BITS = 1,
  parameter integer ADC_CYCLES = 1
) (
  input  wire                                 clk,
  input  wire [15:0]                          m_sram_addr,
  input  wire                                 m_sram_we,
  input  wire [N_SLICES*COLS*CELL_BITS-1:0]   m_sram_wdata,
  input  wire                                 m_sram_re,
  output wire [N_SLICES*COLS*CELL_BITS-1:0]   m_sram_rdata,
  input  wire                                 m_adc_start,
  output wire                                 m_adc_done,
  output wire [N_SLICES*COLS*ADC_BITS-1:0]    m_adc_code,
  input  wire [N_SLICES*COLS*ADC_BITS-1:0]    ext_code,
  input  wire [15:0]                          adc_extra,
  input  wire                                 adc_stall
);
  reg [N_SLICES*COLS*CELL_BITS-1:0] sram [0:ROWS-1];
  integer i;
  initial for (i = 0; i < ROWS; i = i + 1) sram[i] = 0;
  always @(posedge clk)
    if (m_sram_we && m_sram_addr < ROWS) sram[m_sram_addr] <= m_sram_wdata;
  assign m_sram_rdata = (m_sram_re && m_sram_addr < ROWS) ? sram[m_sram_addr] : 0;

  reg [31:0] remaining;
  initial remaining = 0;
  always @(posedge clk)
    if (m_adc_start) remaining <= ADC_CYCLES - 1 + adc_extra;
    else if (remaining != 0 && !adc_stall) remaining <= remaining - 1;
  assign m_adc_done = (remaining == 1 && !adc_stall);
  assign m_adc_code = ext_code;
endmodule
`default_nettype wire
