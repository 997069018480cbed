//! Model-specific registers every vCPU starts with.

use kvm_bindings::{kvm_msr_entry, Msrs};

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

/// IA32_MISC_ENABLE: fast-string operations enabled.
const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRRdefType: MTRRs enabled, default memory type write-back.
const MTRR_ENABLE: u64 = 1 << 11;
const MTRR_MEM_TYPE_WB: u64 = 0x6;

/// The MSRs (index, value) a vCPU is given before it first runs: syscall
/// and sysenter MSRs cleared, TSC at 0, fast strings on, and write-back as
/// the default memory type (without it Linux maps all RAM uncached).
pub fn boot_msr_entries() -> Vec<(u32, u64)> {
    vec![
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_MEM_TYPE_WB),
    ]
}

/// [`boot_msr_entries`] as the KVM_SET_MSRS argument.
pub fn boot_msrs() -> Result<Msrs, vmm_sys_util::fam::Error> {
    let entries: Vec<kvm_msr_entry> = boot_msr_entries()
        .into_iter()
        .map(|(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    Msrs::from_entries(&entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_msrs_contents() {
        let msrs = boot_msrs().unwrap();
        assert_eq!(msrs.as_slice().len(), boot_msr_entries().len());
        let get = |i| msrs.as_slice().iter().find(|e| e.index == i).unwrap().data;
        assert_eq!(get(MSR_MTRR_DEF_TYPE), 0x806);
        assert_eq!(get(MSR_IA32_MISC_ENABLE), 1);
        assert_eq!(get(MSR_LSTAR), 0);
    }
}
