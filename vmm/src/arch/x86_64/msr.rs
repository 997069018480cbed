//! Model-specific registers every vCPU starts with, filtered by what the host's KVM
//! reports, so that evmm never hands KVM an MSR it may refuse.
//!
//! Which MSRs a KVM accepts differs from host to host. evmm sets an MSR only when the
//! host vouches for it: KVM_GET_MSR_INDEX_LIST lists it, or, for the MTRR default type
//! (which KVM emulates but does not list), the supported CPUID has the MTRR bit, as
//! QEMU decides it. evmm sets no feature MSR (those of KVM_GET_MSR_FEATURE_INDEX_LIST,
//! IA32_ARCH_CAPABILITIES among them): the guest reads KVM's own values. If KVM still
//! refuses one, vCPU creation fails with an error that names it.

use std::collections::BTreeSet;

use kvm_bindings::{kvm_msr_entry, CpuId, Msrs};
use kvm_ioctls::Kvm;

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

/// CPUID leaf 1 EDX: the CPU has MTRRs.
const LEAF1_EDX_MTRR: u32 = 1 << 12;

/// When the host vouches for an MSR.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Vouched {
    /// KVM_GET_MSR_INDEX_LIST lists it.
    Listed,
    /// The supported CPUID has MTRRs.
    Mtrr,
}

/// One MSR a vCPU starts with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BootMsr {
    /// The MSR's index.
    pub index: u32,
    /// Its name, for messages.
    pub name: &'static str,
    /// The value set.
    pub value: u64,
    vouched: Vouched,
}

/// Syscall and sysenter MSRs cleared, TSC at 0, fast strings on, and write-back as the
/// default memory type (without it Linux maps all RAM uncached).
const BOOT_MSRS: &[BootMsr] = &[
    boot(MSR_IA32_SYSENTER_CS, "IA32_SYSENTER_CS", 0),
    boot(MSR_IA32_SYSENTER_ESP, "IA32_SYSENTER_ESP", 0),
    boot(MSR_IA32_SYSENTER_EIP, "IA32_SYSENTER_EIP", 0),
    boot(MSR_STAR, "STAR", 0),
    boot(MSR_CSTAR, "CSTAR", 0),
    boot(MSR_KERNEL_GS_BASE, "KERNEL_GS_BASE", 0),
    boot(MSR_SYSCALL_MASK, "SYSCALL_MASK", 0),
    boot(MSR_LSTAR, "LSTAR", 0),
    boot(MSR_IA32_TSC, "IA32_TSC", 0),
    boot(
        MSR_IA32_MISC_ENABLE,
        "IA32_MISC_ENABLE",
        MISC_ENABLE_FAST_STRING,
    ),
    BootMsr {
        index: MSR_MTRR_DEF_TYPE,
        name: "MTRR_DEF_TYPE",
        value: MTRR_ENABLE | MTRR_MEM_TYPE_WB,
        vouched: Vouched::Mtrr,
    },
];

const fn boot(index: u32, name: &'static str, value: u64) -> BootMsr {
    BootMsr {
        index,
        name,
        value,
        vouched: Vouched::Listed,
    }
}

/// What the host's KVM says about MSRs.
#[derive(Clone, Debug, Default)]
pub struct HostMsrs {
    /// KVM_GET_MSR_INDEX_LIST.
    pub listed: BTreeSet<u32>,
    /// KVM_GET_MSR_FEATURE_INDEX_LIST (empty where KVM has none).
    pub features: BTreeSet<u32>,
    /// The supported CPUID has MTRRs.
    pub mtrr: bool,
}

impl HostMsrs {
    /// Asks `kvm`; `cpuid` is its supported CPUID.
    pub fn query(kvm: &Kvm, cpuid: &CpuId) -> Result<Self, kvm_ioctls::Error> {
        let listed = kvm
            .get_msr_index_list()?
            .as_slice()
            .iter()
            .copied()
            .collect();
        // Older kernels lack the feature list; evmm then simply knows of none.
        let features = kvm
            .get_msr_feature_index_list()
            .map(|l| l.as_slice().iter().copied().collect())
            .unwrap_or_default();
        let mtrr = cpuid
            .as_slice()
            .iter()
            .any(|e| e.function == 1 && e.edx & LEAF1_EDX_MTRR != 0);
        Ok(HostMsrs {
            listed,
            features,
            mtrr,
        })
    }

    fn vouches_for(&self, msr: &BootMsr) -> bool {
        if self.features.contains(&msr.index) {
            return false;
        }
        match msr.vouched {
            Vouched::Listed => self.listed.contains(&msr.index),
            Vouched::Mtrr => self.mtrr,
        }
    }
}

/// The boot MSRs this host vouches for; the others are logged and left at KVM's reset
/// value.
pub fn boot_msr_entries(host: &HostMsrs) -> Vec<BootMsr> {
    BOOT_MSRS
        .iter()
        .filter(|m| {
            let ok = host.vouches_for(m);
            if !ok {
                log::debug!(
                    "MSR {:#x} ({}) not set: this host's KVM does not offer it",
                    m.index,
                    m.name
                );
            }
            ok
        })
        .copied()
        .collect()
}

/// `entries` as the KVM_SET_MSRS argument.
pub fn to_kvm_msrs(entries: &[BootMsr]) -> Result<Msrs, vmm_sys_util::fam::Error> {
    let entries: Vec<kvm_msr_entry> = entries
        .iter()
        .map(|m| kvm_msr_entry {
            index: m.index,
            data: m.value,
            ..Default::default()
        })
        .collect();
    Msrs::from_entries(&entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_listed() -> HostMsrs {
        HostMsrs {
            listed: BOOT_MSRS.iter().map(|m| m.index).collect(),
            features: BTreeSet::new(),
            mtrr: true,
        }
    }

    #[test]
    fn every_msr_is_set_where_the_host_vouches_for_all() {
        let entries = boot_msr_entries(&all_listed());
        assert_eq!(entries.len(), BOOT_MSRS.len());
        let msrs = to_kvm_msrs(&entries).unwrap();
        let get = |i| msrs.as_slice().iter().find(|e| e.index == i).unwrap().data;
        assert_eq!(get(MSR_MTRR_DEF_TYPE), 0x806);
        assert_eq!(get(MSR_IA32_MISC_ENABLE), 1);
        assert_eq!(get(MSR_LSTAR), 0);
    }

    #[test]
    fn msrs_the_host_does_not_list_are_left_out() {
        let mut host = all_listed();
        host.listed.remove(&MSR_IA32_MISC_ENABLE);
        host.listed.remove(&MSR_CSTAR);
        let got: Vec<u32> = boot_msr_entries(&host).iter().map(|m| m.index).collect();
        assert!(!got.contains(&MSR_IA32_MISC_ENABLE) && !got.contains(&MSR_CSTAR));
        assert_eq!(got.len(), BOOT_MSRS.len() - 2);
    }

    #[test]
    fn the_mtrr_default_type_follows_cpuid_not_the_list() {
        let mut host = all_listed();
        host.listed.clear();
        let got: Vec<u32> = boot_msr_entries(&host).iter().map(|m| m.index).collect();
        assert_eq!(got, vec![MSR_MTRR_DEF_TYPE]);
        host.mtrr = false;
        assert!(boot_msr_entries(&host).is_empty());
    }

    #[test]
    fn a_feature_msr_is_never_set() {
        let mut host = all_listed();
        host.features.insert(MSR_IA32_TSC);
        let got: Vec<u32> = boot_msr_entries(&host).iter().map(|m| m.index).collect();
        assert!(!got.contains(&MSR_IA32_TSC));
    }

    /// This host's KVM takes every boot MSR the filter keeps.
    #[test]
    fn this_hosts_kvm_accepts_the_filtered_msrs() {
        let kvm = Kvm::new().expect("/dev/kvm is needed");
        let cpuid = kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .unwrap();
        let host = HostMsrs::query(&kvm, &cpuid).unwrap();
        let entries = boot_msr_entries(&host);
        assert!(!entries.is_empty(), "no boot MSR kept: {host:?}");
        let vm = kvm.create_vm().unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        let msrs = to_kvm_msrs(&entries).unwrap();
        let set = vcpu.set_msrs(&msrs).unwrap();
        assert_eq!(
            set,
            entries.len(),
            "KVM refused {:?}",
            entries.get(set).map(|m| m.name)
        );
    }
}
