# Vivado batch build of the cimlab_ctrl overlay for a PYNQ-Z2 (xc7z020clg400-1).
#
#   scripts/build_overlay.py --profile default        # writes params.tcl, runs this, records the manifest entry
#   vivado -mode batch -source bitstreams/vivado/build.tcl -tclargs <repo> <params.tcl> <out_dir>
#
# Block design: the Zynq PS (M_AXI_GP0, FCLK_CLK0 at the profile's clock, IRQ_F2P), an AXI interconnect, and
# cimlab_board_top (module reference: cimlab_ctrl + the pad wrapper) at 0x43C0_0000 (1 MiB), named cimlab_ctrl_0
# as the manifest's interfaces.ctrl says. Produces <out_dir>/cimlab_ctrl.bit and <out_dir>/cimlab_ctrl.hwh.
# Not run on the project's machines (no Vivado there); checked by hand on Vivado 2022.2.

if {[llength $argv] != 3} {
  error "usage: vivado -mode batch -source build.tcl -tclargs <repo> <params.tcl> <out_dir>"
}
lassign $argv repo params_file out_dir
source $params_file   ;# sets CIMLAB_PARAMS (a dict: NAME value) and CIMLAB_CLOCK_MHZ

set part xc7z020clg400-1
set proj_dir [file join $out_dir vivado_project]
create_project -force cimlab_ctrl $proj_dir -part $part
set board_parts [get_board_parts -quiet *pynq-z2*]
if {[llength $board_parts]} { set_property board_part [lindex $board_parts end] [current_project] }

set rtl [file join $repo bitstreams rtl]
add_files -norecurse [list \
  [file join $rtl cimlab_regs.sv] [file join $rtl cimlab_axil.sv] [file join $rtl cimlab_buffers.sv] \
  [file join $rtl cimlab_seq.sv] [file join $rtl cimlab_ctrl.sv] \
  [file join $repo bitstreams vivado cimlab_pads.sv] [file join $repo bitstreams vivado cimlab_board_top.v]]
update_compile_order -fileset sources_1

create_bd_design cimlab
set ps [create_bd_cell -type ip -vlnv xilinx.com:ip:processing_system7:5.5 ps7]
if {[llength $board_parts]} {
  apply_bd_automation -rule xilinx.com:bd_rule:processing_system7 -config {make_external "FIXED_IO, DDR" apply_board_preset "1"} $ps
} else {
  apply_bd_automation -rule xilinx.com:bd_rule:processing_system7 -config {make_external "FIXED_IO, DDR"} $ps
}
set_property -dict [list CONFIG.PCW_USE_M_AXI_GP0 {1} CONFIG.PCW_USE_FABRIC_INTERRUPT {1} CONFIG.PCW_IRQ_F2P_INTR {1} \
  CONFIG.PCW_FPGA0_PERIPHERAL_FREQMHZ $CIMLAB_CLOCK_MHZ] $ps

set ctrl [create_bd_cell -type module -reference cimlab_board_top cimlab_ctrl_0]
dict for {name value} $CIMLAB_PARAMS { set_property CONFIG.$name $value $ctrl }

apply_bd_automation -rule xilinx.com:bd_rule:axi4 -config {Master "/ps7/M_AXI_GP0" Clk "Auto"} [get_bd_intf_pins cimlab_ctrl_0/s_axi]
connect_bd_net [get_bd_pins cimlab_ctrl_0/irq] [get_bd_pins ps7/IRQ_F2P]
set seg [get_bd_addr_segs -of_objects [get_bd_addr_spaces ps7/Data] -filter {NAME =~ *cimlab_ctrl_0*}]
set_property offset 0x43C00000 $seg
set_property range 1M $seg
validate_bd_design
save_bd_design

make_wrapper -files [get_files cimlab.bd] -top
add_files -norecurse [file join $proj_dir cimlab_ctrl.gen sources_1 bd cimlab hdl cimlab_wrapper.v]
set_property top cimlab_wrapper [current_fileset]
update_compile_order -fileset sources_1

launch_runs impl_1 -to_step write_bitstream -jobs 4
wait_on_run impl_1
if {[get_property PROGRESS [get_runs impl_1]] != "100%"} { error "implementation failed" }
set wns [get_property STATS.WNS [get_runs impl_1]]
puts "cimlab: worst negative slack $wns ns at $CIMLAB_CLOCK_MHZ MHz"

file mkdir $out_dir
set bit [lindex [glob [file join $proj_dir cimlab_ctrl.runs impl_1 *.bit]] 0]
file copy -force $bit [file join $out_dir cimlab_ctrl.bit]
set hwh [lindex [glob [file join $proj_dir cimlab_ctrl.gen sources_1 bd cimlab hw_handoff *.hwh]] 0]
file copy -force $hwh [file join $out_dir cimlab_ctrl.hwh]
puts "cimlab: wrote [file join $out_dir cimlab_ctrl.bit] and cimlab_ctrl.hwh"
