// The sequencer: runs WRITE_WEIGHTS, READ_WEIGHTS, MAC and MAC_RAW over the buffers and drives the macro port.
//
// Every parameter comes from one source (cimlab.chip_sim.rtl.parameters: the MacroSpec, the fabric layout of
// cimlab.firmware_bridge.fabric and the profile's timing); nothing here restates a geometry. States and their
// lengths in clock cycles (the cycle formulas of cimlab.firmware_bridge.fabric follow from them):
//
//   DECODE  T_OVH                          once per run
//   WLOAD   ROW_WORDS + 1                  a weight row from the input buffer (one cycle of read latency)
//   WWRITE  T_WR                           m_sram_we held, row address and data stable
//   RREAD   T_RD                           m_sram_re held; m_sram_rdata taken on the last cycle
//   RSTORE  ROW_WORDS                      the row into the output buffer
//   VLOAD   span * GROUP_WORDS + 1         a vector's group records from the input buffer
//   VPULSE  T_WL                           per input plane (most significant first): m_wl_pulse held
//   VCONV   until m_adc_done               per row group: m_adc_start on the first cycle, codes taken on done
//   VCODES  CONV_WORDS                     MAC_RAW: one conversion's codes into the output buffer
//   VDRAIN  2                              MAC: the last conversion's accumulate (a two-stage pipeline)
//   VOUT    MAC_WORDS                      MAC: the accumulators into the output buffer
`default_nettype none
module cimlab_seq #(
  parameter integer ROWS = 1,
  parameter integer COLS = 1,
  parameter integer N_GROUPS = 1,
  parameter integer ROWS_PER_CONV = 1,
  parameter integer N_SLICES = 1,
  parameter integer CELL_BITS = 1,
  parameter integer N_PLANES = 1,
  parameter integer SLICE_BITS = 1,
  parameter integer INPUT_BITS = 1,
  parameter integer ADC_BITS = 1,
  parameter integer SIGNED_MSB = 0,
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
  parameter integer T_RD = 1
) (
  input  wire                          clk,
  input  wire                          rst,
  input  wire                          start,
  input  wire [2:0]                    op,
  input  wire [31:0]                   first,
  input  wire [31:0]                   span,
  input  wire [31:0]                   count,
  output wire                          busy,
  output reg                           done,
  output reg                           refused,
  output wire                          conv_event,
  output wire                          vector_event,
  output wire                          in_re,
  output wire [$clog2(IN_WORDS)-1:0]  in_addr,
  input  wire [BUS_BITS-1:0]           in_rdata,
  output wire                          out_we,
  output wire [$clog2(OUT_WORDS)-1:0] out_addr,
  output reg  [BUS_BITS-1:0]           out_wdata,
  output wire [15:0]                   m_sram_addr,
  output wire                          m_sram_we,
  output wire [N_SLICES*COLS*CELL_BITS-1:0]        m_sram_wdata,
  output wire                          m_sram_re,
  input  wire [N_SLICES*COLS*CELL_BITS-1:0]        m_sram_rdata,
  output wire                          m_wl_pulse,
  output wire [$clog2(N_PLANES+1)-1:0] m_wl_plane,
  output wire [$clog2(N_GROUPS+1)-1:0] m_grp,
  output reg  [ROWS_PER_CONV*SLICE_BITS-1:0] m_wl_data,
  output wire                          m_adc_start,
  input  wire                          m_adc_done,
  input  wire [N_SLICES*COLS*ADC_BITS-1:0]         m_adc_code
);
  localparam [2:0] OP_WRITE = 3'd1, OP_READ = 3'd2, OP_MAC = 3'd3, OP_RAW = 3'd4;
  localparam [3:0] S_IDLE = 4'd0, S_DECODE = 4'd1, S_WLOAD = 4'd2, S_WWRITE = 4'd3, S_RREAD = 4'd4,
                   S_RSTORE = 4'd5, S_VLOAD = 4'd6, S_VPULSE = 4'd7, S_VCONV = 4'd8, S_VCODES = 4'd9,
                   S_VDRAIN = 4'd10, S_VOUT = 4'd11;
  localparam integer J = N_SLICES * COLS;
  localparam integer SW = N_SLICES * CELL_BITS;
  localparam integer IN_AW = $clog2(IN_WORDS);
  localparam integer OUT_AW = $clog2(OUT_WORDS);
  localparam integer GW = $clog2(N_GROUPS + 1);
  localparam integer PW = $clog2(N_PLANES + 1);
  localparam integer REC = GROUP_WORDS * BUS_BITS;
  localparam integer CPW = BUS_BITS / CODE_BITS;               // codes per output word
  localparam integer CODE_REG = CONV_WORDS * CPW * ADC_BITS;
  localparam integer ACC_W = MAC_WORDS * BUS_BITS;

  reg [3:0]  state;
  reg [2:0]  op_q;
  reg [31:0] first_q, span_q, count_q, item, cnt;
  reg [PW-1:0] plane;
  reg [GW-1:0] gi;
  reg [GW-1:0] gsel;    // where group gi's record sits in vec_reg: N_GROUPS - span + gi, kept as a register
  reg        conv_started;
  // the accumulate pipeline: codes (code_reg) -> a column's slice sum (colsum_q) -> acc; each stage carries
  // whether it holds data (pend) and whether it is the first group of a plane (Horner: acc << SLICE_BITS first)
  reg        code_pend, code_first, sum_pend, sum_first;
  reg        drain;
  reg [IN_AW:0]  in_ptr;
  reg [OUT_AW:0] out_ptr;
  reg [ROW_WORDS*BUS_BITS-1:0] row_reg;
  reg [N_GROUPS*REC-1:0]       vec_reg;
  reg [CODE_REG-1:0]           code_reg;
  reg [ACC_W-1:0]              acc;

  assign busy = (state != S_IDLE);

  // ---- start: validate, then run ---------------------------------------------------------------------------
  // The products are registered from the (stable) run registers every cycle, so the check at SEQ_START is short;
  // the processor writes SEQ_FIRST/SPAN/COUNT at least one AXI write (two cycles) before SEQ_START.
  reg [31:0] count_span;
  reg        small_args;
  always @(posedge clk) begin
    count_span <= count[15:0] * span[15:0];
    small_args <= count[31:16] == 0 && span[31:16] == 0 && first[31:16] == 0;
  end
  wire [47:0] rows_in  = count[15:0] * ROW_WORDS;
  wire [47:0] vec_in   = count_span * GROUP_WORDS;
  wire [47:0] vec_out  = (op == OP_RAW) ? count_span * (N_PLANES * CONV_WORDS) : count[15:0] * MAC_WORDS;
  wire weights_ok = first[15:0] + count[15:0] <= ROWS && rows_in <= ((op == OP_WRITE) ? IN_WORDS : OUT_WORDS);
  wire mac_ok = span != 0 && first[15:0] + span[15:0] <= N_GROUPS && vec_in <= IN_WORDS && vec_out <= OUT_WORDS;
  wire start_ok = small_args && count != 0 &&
                  (((op == OP_WRITE || op == OP_READ) && weights_ok) || ((op == OP_MAC || op == OP_RAW) && mac_ok));
  wire is_raw = (op_q == OP_RAW);
  wire last_item = (item + 1 == count_q);
  wire [31:0] vload_words = span_q * GROUP_WORDS;

  // ---- the macro port and the buffers' ports ----------------------------------------------------------------
  assign m_sram_addr  = first_q[15:0] + item[15:0];
  assign m_sram_we    = (state == S_WWRITE);
  assign m_sram_re    = (state == S_RREAD);
  assign m_wl_pulse   = (state == S_VPULSE);
  assign m_wl_plane   = plane;
  assign m_grp        = first_q[GW-1:0] + gi;
  assign m_adc_start  = (state == S_VCONV) && !conv_started;
  assign conv_event   = (state == S_VCONV) && m_adc_done;
  assign in_re   = (state == S_WLOAD && cnt < ROW_WORDS) || (state == S_VLOAD && cnt < vload_words);
  assign in_addr = in_ptr[IN_AW-1:0] + cnt[IN_AW-1:0];
  assign out_we   = (state == S_RSTORE) || (state == S_VCODES) || (state == S_VOUT);
  assign out_addr = out_ptr[OUT_AW-1:0] + cnt[OUT_AW-1:0];
  assign vector_event = (state == S_VOUT && cnt == MAC_WORDS - 1) ||
                        (state == S_VCODES && cnt == CONV_WORDS - 1 && plane == 0 && gi + 1 == span_q);

  // weight rows: the buffer record holds column c's stored value at [c*SW +: SW]; the macro's row holds physical
  // column j = k*COLS + c at [j*CELL_BITS +: CELL_BITS]
  genvar gc, gk, gr;
  wire [ROW_WORDS*BUS_BITS-1:0] row_from_sram;
  generate
    for (gc = 0; gc < COLS; gc = gc + 1) begin : wire_cols
      for (gk = 0; gk < N_SLICES; gk = gk + 1) begin : wire_slices
        assign m_sram_wdata[(gk*COLS + gc)*CELL_BITS +: CELL_BITS] = row_reg[gc*SW + gk*CELL_BITS +: CELL_BITS];
        assign row_from_sram[gc*SW + gk*CELL_BITS +: CELL_BITS] = m_sram_rdata[(gk*COLS + gc)*CELL_BITS +: CELL_BITS];
      end
    end
    if (ROW_WORDS*BUS_BITS > COLS*SW) begin : row_pad
      assign row_from_sram[ROW_WORDS*BUS_BITS-1:COLS*SW] = 0;
    end
  endgenerate

  // the word lines of group gi for plane `plane`: the loaded records sit at the top of vec_reg
  reg [REC-1:0] grp_rec;
  integer g;
  always @* begin
    grp_rec = {REC{1'b0}};
    for (g = 0; g < N_GROUPS; g = g + 1)
      if (gsel == g) grp_rec = vec_reg[g*REC +: REC];
  end
  generate
    for (gr = 0; gr < ROWS_PER_CONV; gr = gr + 1) begin : wl_rows
      wire [INPUT_BITS-1:0] value = grp_rec[gr*INPUT_BITS +: INPUT_BITS];
      wire [INPUT_BITS-1:0] shifted = value >> (plane * SLICE_BITS);
      always @* m_wl_data[gr*SLICE_BITS +: SLICE_BITS] = shifted[SLICE_BITS-1:0];
    end
  endgenerate

  // output words: codes widened to CODE_BITS, accumulators, weight rows
  wire [BUS_BITS-1:0] codes_word;
  genvar gw;
  generate
    for (gw = 0; gw < CPW; gw = gw + 1) begin : widen
      assign codes_word[gw*CODE_BITS +: CODE_BITS] = {{(CODE_BITS-ADC_BITS){1'b0}}, code_reg[gw*ADC_BITS +: ADC_BITS]};
    end
  endgenerate
  always @* begin
    case (state)
      S_VCODES: out_wdata = codes_word;
      S_VOUT:   out_wdata = acc[BUS_BITS-1:0];
      S_RSTORE: out_wdata = row_reg[BUS_BITS-1:0];
      default:  out_wdata = {BUS_BITS{1'b0}};
    endcase
  end

  // ---- the accumulators: acc[c] = sum over planes (MSB first, Horner) and groups of the column's code sum ----
  // a column's sum of codes over its slices fits CS bits signed
  localparam integer CS = ADC_BITS + N_SLICES * CELL_BITS + 1;
  wire [COLS*CS-1:0] colsum_all;
  reg  [COLS*CS-1:0] colsum_q;
  wire [ACC_W-1:0] acc_next;
  generate
    for (gc = 0; gc < COLS; gc = gc + 1) begin : accumulate
      reg signed [CS-1:0] colsum;
      integer k;
      always @* begin
        colsum = {CS{1'b0}};
        for (k = 0; k < N_SLICES; k = k + 1)
          if (SIGNED_MSB != 0 && k == N_SLICES - 1)
            colsum = colsum - ($signed({1'b0, code_reg[(k*COLS + gc)*ADC_BITS +: ADC_BITS]}) <<< (k*CELL_BITS));
          else
            colsum = colsum + ($signed({1'b0, code_reg[(k*COLS + gc)*ADC_BITS +: ADC_BITS]}) <<< (k*CELL_BITS));
      end
      assign colsum_all[gc*CS +: CS] = colsum;
      wire [CS-1:0] cs_q = colsum_q[gc*CS +: CS];
      wire [31:0] base = sum_first ? (acc[gc*32 +: 32] << SLICE_BITS) : acc[gc*32 +: 32];
      assign acc_next[gc*32 +: 32] = base + {{(32-CS){cs_q[CS-1]}}, cs_q};
    end
    if (ACC_W > COLS*32) begin : acc_pad
      assign acc_next[ACC_W-1:COLS*32] = 0;
    end
  endgenerate

  always @(posedge clk) begin
    if (rst) begin
      sum_pend <= 1'b0;
      sum_first <= 1'b0;
    end else begin
      colsum_q <= colsum_all;
      sum_pend <= code_pend;
      sum_first <= code_first;
    end
    if (rst || (state == S_VLOAD && cnt == 0)) acc <= {ACC_W{1'b0}};
    else if (state == S_VOUT) acc <= acc >> BUS_BITS;
    else if (sum_pend) acc <= acc_next;
  end

  // ---- the state machine -------------------------------------------------------------------------------------
  task automatic begin_item;
    begin
      cnt <= 32'd0;
      conv_started <= 1'b0;
      case (op_q)
        OP_WRITE: state <= S_WLOAD;
        OP_READ: begin state <= S_RREAD; cnt <= T_RD - 1; end
        default: state <= S_VLOAD;
      endcase
    end
  endtask

  task automatic end_item;
    begin
      item <= item + 1;
      if (last_item) begin
        state <= S_IDLE;
        done <= 1'b1;
      end else begin
        begin_item();
      end
    end
  endtask

  task automatic next_conversion;  // after group gi of plane `plane` has been converted (and stored)
    begin
      cnt <= 32'd0;
      conv_started <= 1'b0;
      if (gi + 1 < span_q) begin
        gi <= gi + 1;
        gsel <= gsel + 1;
        state <= S_VCONV;
      end else if (plane != 0) begin
        plane <= plane - 1;
        gi <= 0;
        gsel <= N_GROUPS - span_q;
        state <= S_VPULSE;
        cnt <= T_WL - 1;
      end else if (is_raw) begin
        end_item();
      end else begin
        state <= S_VDRAIN;
        drain <= 1'b0;
      end
    end
  endtask

  always @(posedge clk) begin
    if (rst) begin
      state <= S_IDLE;
      done <= 1'b0;
      refused <= 1'b0;
      code_pend <= 1'b0;
      code_first <= 1'b0;
      conv_started <= 1'b0;
    end else begin
      code_pend <= 1'b0;
      case (state)
        S_IDLE:
          if (start) begin
            done <= 1'b0;
            refused <= !start_ok;
            if (start_ok) begin
              op_q <= op;
              first_q <= first;
              span_q <= span;
              count_q <= count;
              item <= 32'd0;
              in_ptr <= 0;
              out_ptr <= 0;
              if (T_OVH > 0) begin
                state <= S_DECODE;
                cnt <= T_OVH - 1;
              end else begin
                cnt <= 32'd0;
                conv_started <= 1'b0;
                case (op)
                  OP_WRITE: state <= S_WLOAD;
                  OP_READ: begin state <= S_RREAD; cnt <= T_RD - 1; end
                  default: state <= S_VLOAD;
                endcase
              end
            end
          end
        S_DECODE:
          if (cnt == 0) begin_item();
          else cnt <= cnt - 1;
        S_WLOAD: begin
          if (cnt != 0) row_reg <= {in_rdata, row_reg} >> BUS_BITS;
          if (cnt == ROW_WORDS) begin
            in_ptr <= in_ptr + ROW_WORDS;
            state <= S_WWRITE;
            cnt <= T_WR - 1;
          end else begin
            cnt <= cnt + 1;
          end
        end
        S_WWRITE:
          if (cnt == 0) end_item();
          else cnt <= cnt - 1;
        S_RREAD:
          if (cnt == 0) begin
            row_reg <= row_from_sram;
            state <= S_RSTORE;
          end else begin
            cnt <= cnt - 1;
          end
        S_RSTORE: begin
          row_reg <= row_reg >> BUS_BITS;
          if (cnt == ROW_WORDS - 1) begin
            out_ptr <= out_ptr + ROW_WORDS;
            end_item();
          end else begin
            cnt <= cnt + 1;
          end
        end
        S_VLOAD: begin
          if (cnt != 0) vec_reg <= {in_rdata, vec_reg} >> BUS_BITS;
          if (cnt == vload_words) begin
            in_ptr <= in_ptr + vload_words;
            plane <= N_PLANES - 1;
            gi <= 0;
            gsel <= N_GROUPS - span_q;
            state <= S_VPULSE;
            cnt <= T_WL - 1;
          end else begin
            cnt <= cnt + 1;
          end
        end
        S_VPULSE:
          if (cnt == 0) begin
            state <= S_VCONV;
            conv_started <= 1'b0;
          end else begin
            cnt <= cnt - 1;
          end
        S_VCONV: begin
          conv_started <= 1'b1;
          if (m_adc_done) begin
            code_reg <= {{(CODE_REG-N_SLICES*COLS*ADC_BITS){1'b0}}, m_adc_code};
            if (is_raw) begin
              state <= S_VCODES;
              cnt <= 32'd0;
            end else begin
              code_pend <= 1'b1;
              code_first <= (gi == 0);
              next_conversion();
            end
          end
        end
        S_VCODES: begin
          code_reg <= code_reg >> (CPW * ADC_BITS);
          if (cnt == CONV_WORDS - 1) begin
            out_ptr <= out_ptr + CONV_WORDS;
            next_conversion();
          end else begin
            cnt <= cnt + 1;
          end
        end
        S_VDRAIN:
          if (drain) begin
            state <= S_VOUT;
            cnt <= 32'd0;
          end else begin
            drain <= 1'b1;
          end
        S_VOUT:
          if (cnt == MAC_WORDS - 1) begin
            out_ptr <= out_ptr + MAC_WORDS;
            end_item();
          end else begin
            cnt <= cnt + 1;
          end
        default: state <= S_IDLE;
      endcase
    end
  end
endmodule
`default_nettype wire
