
/*
 * smolvm: `lapic_timer_period=N` (APIC timer ticks per jiffy) skips the APIC timer calibration.
 * Under QEMU's TCG there is no TSC-deadline timer, so without this the kernel measures the APIC
 * timer against the PIT for ~0.2 s at every boot, or (with nolapic_timer) ticks periodically
 * and never idles tickless. QEMU's APIC runs at 1 GHz, so the host passes 1000000000 / HZ.
 */
static int __init smolvm_lapic_timer_period(char *arg)
{
	return kstrtouint(arg, 0, &lapic_timer_period);
}
early_param("lapic_timer_period", smolvm_lapic_timer_period);
