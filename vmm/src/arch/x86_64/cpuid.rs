//! Guest CPUID: what KVM supports, with the topology of an evmm VM (one
//! socket, one thread per core, one core per vCPU, APIC id = vCPU index) and
//! the hypervisor leaves a Linux guest looks for.

use kvm_bindings::{
    kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX as KVM_CPUID_FLAG_SIGNIFICANT_INDEX,
};

const LEAF_VENDOR: u32 = 0x0;
const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const LEAF_V2_EXT_TOPOLOGY: u32 = 0x1f;
const LEAF_HYPERVISOR: u32 = 0x4000_0000;
const LEAF_KVM_FEATURES: u32 = 0x4000_0001;
const LEAF_AMD_SIZE_IDS: u32 = 0x8000_0008;
const LEAF_AMD_CACHE_TOPOLOGY: u32 = 0x8000_001d;
const LEAF_AMD_EXT_APIC_ID: u32 = 0x8000_001e;

const LEAF1_ECX_TSC_DEADLINE: u32 = 1 << 24;
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
const LEAF1_EDX_HTT: u32 = 1 << 28;

/// Topology level types of leaf 0xb/0x1f (ECX[15:8]).
const LEVEL_TYPE_SMT: u32 = 1;
const LEVEL_TYPE_CORE: u32 = 2;

/// "KVMKVMKVM\0\0\0" as EBX, ECX, EDX.
const KVM_SIGNATURE: [u32; 3] = [0x4b4d_564b, 0x564b_4d56, 0x0000_004d];

/// CPU vendor, as far as topology leaves are concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Vendor {
    /// GenuineIntel.
    Intel,
    /// AuthenticAMD or HygonGenuine.
    Amd,
    /// Anything else.
    Other,
}

/// Reads the vendor from leaf 0.
pub fn vendor(cpuid: &CpuId) -> Vendor {
    let Some(leaf0) = cpuid.as_slice().iter().find(|e| e.function == LEAF_VENDOR) else {
        return Vendor::Other;
    };
    let mut id = [0u8; 12];
    id[..4].copy_from_slice(&leaf0.ebx.to_le_bytes());
    id[4..8].copy_from_slice(&leaf0.edx.to_le_bytes());
    id[8..].copy_from_slice(&leaf0.ecx.to_le_bytes());
    match &id {
        b"GenuineIntel" => Vendor::Intel,
        b"AuthenticAMD" | b"HygonGenuine" => Vendor::Amd,
        _ => Vendor::Other,
    }
}

/// Number of bits needed to hold `n` distinct ids (ceil(log2(n))).
fn id_bits(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

/// What [`patch_cpuid`] needs to know about the vCPU.
#[derive(Clone, Copy, Debug)]
pub struct VcpuTopology {
    /// Index of this vCPU; also its APIC id.
    pub index: u8,
    /// Number of vCPUs in the VM.
    pub count: u8,
    /// Whether KVM emulates the TSC deadline timer (KVM_CAP_TSC_DEADLINE_TIMER).
    pub tsc_deadline: bool,
}

/// Adapts KVM's supported CPUID for one vCPU.
pub fn patch_cpuid(cpuid: &mut CpuId, topo: VcpuTopology) -> Result<(), vmm_sys_util::fam::Error> {
    let vendor = vendor(cpuid);
    let apic_id = u32::from(topo.index);
    let count = u32::from(topo.count).max(1);

    for e in cpuid.as_mut_slice() {
        match e.function {
            LEAF_FEATURES => {
                e.ebx = (e.ebx & 0x0000_ffff) | (apic_id << 24) | ((count & 0xff) << 16);
                e.ecx |= LEAF1_ECX_HYPERVISOR;
                if topo.tsc_deadline {
                    e.ecx |= LEAF1_ECX_TSC_DEADLINE;
                }
                if count > 1 {
                    e.edx |= LEAF1_EDX_HTT;
                } else {
                    e.edx &= !LEAF1_EDX_HTT;
                }
            }
            LEAF_CACHE_PARAMS if vendor == Vendor::Intel => {
                patch_cache_sharing(e, count);
                e.eax = (e.eax & 0x03ff_ffff) | ((count - 1).min(63) << 26);
            }
            LEAF_EXT_TOPOLOGY | LEAF_V2_EXT_TOPOLOGY => {
                patch_topology_level(e, apic_id, count);
            }
            LEAF_HYPERVISOR => {
                e.eax = e.eax.max(LEAF_KVM_FEATURES);
                [e.ebx, e.ecx, e.edx] = KVM_SIGNATURE;
            }
            LEAF_AMD_SIZE_IDS if vendor == Vendor::Amd => {
                e.ecx = (e.ecx & !0xf0ff) | (id_bits(count) << 12) | ((count - 1) & 0xff);
            }
            LEAF_AMD_CACHE_TOPOLOGY if vendor == Vendor::Amd => {
                patch_cache_sharing(e, count);
            }
            LEAF_AMD_EXT_APIC_ID if vendor == Vendor::Amd => {
                e.eax = apic_id;
                // One thread per compute unit; unit id = APIC id.
                e.ebx = apic_id & 0xff;
                // One node, node id 0.
                e.ecx = 0;
            }
            _ => {}
        }
    }

    if !cpuid
        .as_slice()
        .iter()
        .any(|e| e.function == LEAF_HYPERVISOR)
    {
        cpuid.push(kvm_cpuid_entry2 {
            function: LEAF_HYPERVISOR,
            eax: LEAF_KVM_FEATURES,
            ebx: KVM_SIGNATURE[0],
            ecx: KVM_SIGNATURE[1],
            edx: KVM_SIGNATURE[2],
            ..Default::default()
        })?;
    }
    Ok(())
}

/// Sets "logical processors sharing this cache" (EAX[25:14]) for leaf 4 /
/// 0x8000001d: private L1/L2, L3 shared by every vCPU.
fn patch_cache_sharing(e: &mut kvm_cpuid_entry2, count: u32) {
    let level = (e.eax >> 5) & 0x7;
    let sharing = if level >= 3 { count - 1 } else { 0 };
    e.eax = (e.eax & !(0xfff << 14)) | ((sharing & 0xfff) << 14);
}

/// Fills one sub-leaf of leaf 0xb/0x1f: level 0 is SMT (one thread per
/// core), level 1 is core (`count` cores), higher levels are invalid.
fn patch_topology_level(e: &mut kvm_cpuid_entry2, apic_id: u32, count: u32) {
    e.flags |= KVM_CPUID_FLAG_SIGNIFICANT_INDEX;
    e.edx = apic_id;
    match e.index {
        0 => {
            e.eax = 0;
            e.ebx = 1;
            e.ecx = LEVEL_TYPE_SMT << 8;
        }
        1 => {
            e.eax = id_bits(count);
            e.ebx = count;
            e.ecx = (LEVEL_TYPE_CORE << 8) | 1;
        }
        n => {
            e.eax = 0;
            e.ebx = 0;
            e.ecx = n & 0xff;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(
        function: u32,
        index: u32,
        eax: u32,
        ebx: u32,
        ecx: u32,
        edx: u32,
    ) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax,
            ebx,
            ecx,
            edx,
            ..Default::default()
        }
    }

    fn vendor_leaf(id: &[u8; 12]) -> kvm_cpuid_entry2 {
        let w = |i: usize| u32::from_le_bytes(id[i..i + 4].try_into().unwrap());
        entry(0, 0, 0x1f, w(0), w(8), w(4))
    }

    fn find(c: &CpuId, f: u32, i: u32) -> kvm_cpuid_entry2 {
        *c.as_slice()
            .iter()
            .find(|e| e.function == f && e.index == i)
            .unwrap()
    }

    #[test]
    fn id_bits_values() {
        assert_eq!(id_bits(1), 0);
        assert_eq!(id_bits(2), 1);
        assert_eq!(id_bits(3), 2);
        assert_eq!(id_bits(4), 2);
        assert_eq!(id_bits(5), 3);
    }

    #[test]
    fn intel_topology() {
        let mut c = CpuId::from_entries(&[
            vendor_leaf(b"GenuineIntel"),
            entry(1, 0, 0x906ea, 0xff00_0800, 0, 0),
            entry(4, 0, (1 << 5) | 0x1c00_4121, 0, 0, 0),
            entry(4, 3, (3 << 5) | 0x1c00_4163, 0, 0, 0),
            entry(0xb, 0, 0, 0, 0, 0),
            entry(0xb, 1, 0, 0, 0, 0),
            entry(0xb, 2, 0, 0, 0, 0),
            entry(0x4000_0000, 0, 0x4000_0001, 0, 0, 0),
        ])
        .unwrap();
        assert_eq!(vendor(&c), Vendor::Intel);
        patch_cpuid(
            &mut c,
            VcpuTopology {
                index: 2,
                count: 3,
                tsc_deadline: true,
            },
        )
        .unwrap();

        let l1 = find(&c, 1, 0);
        assert_eq!(l1.ebx >> 24, 2);
        assert_eq!((l1.ebx >> 16) & 0xff, 3);
        assert_eq!(l1.ebx & 0xffff, 0x0800);
        assert_ne!(l1.ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_ne!(l1.ecx & LEAF1_ECX_TSC_DEADLINE, 0);
        assert_ne!(l1.edx & LEAF1_EDX_HTT, 0);

        let l4_l1 = find(&c, 4, 0);
        assert_eq!(l4_l1.eax >> 26, 2);
        assert_eq!((l4_l1.eax >> 14) & 0xfff, 0);
        let l4_l3 = find(&c, 4, 3);
        assert_eq!((l4_l3.eax >> 14) & 0xfff, 2);

        let smt = find(&c, 0xb, 0);
        assert_eq!((smt.eax, smt.ebx, smt.ecx >> 8, smt.edx), (0, 1, 1, 2));
        let core = find(&c, 0xb, 1);
        assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (2, 3, 0x201, 2));
        let inval = find(&c, 0xb, 2);
        assert_eq!((inval.ebx, (inval.ecx >> 8) & 0xff), (0, 0));

        let hv = find(&c, 0x4000_0000, 0);
        let mut sig = Vec::new();
        for r in [hv.ebx, hv.ecx, hv.edx] {
            sig.extend_from_slice(&r.to_le_bytes());
        }
        assert_eq!(&sig, b"KVMKVMKVM\0\0\0");
    }

    #[test]
    fn single_vcpu_has_no_htt_and_adds_hypervisor_leaf() {
        let mut c = CpuId::from_entries(&[
            vendor_leaf(b"AuthenticAMD"),
            entry(1, 0, 0, 0x0500_0800, 0, LEAF1_EDX_HTT),
            entry(0x8000_0008, 0, 0, 0, 0x7003, 0),
            entry(0x8000_001e, 0, 9, 9, 9, 0),
        ])
        .unwrap();
        assert_eq!(vendor(&c), Vendor::Amd);
        patch_cpuid(
            &mut c,
            VcpuTopology {
                index: 0,
                count: 1,
                tsc_deadline: false,
            },
        )
        .unwrap();
        let l1 = find(&c, 1, 0);
        assert_eq!(l1.ebx >> 24, 0);
        assert_eq!(l1.edx & LEAF1_EDX_HTT, 0);
        assert_eq!(l1.ecx & LEAF1_ECX_TSC_DEADLINE, 0);
        assert_eq!(find(&c, 0x8000_0008, 0).ecx & 0xf0ff, 0);
        assert_eq!(find(&c, 0x8000_001e, 0).eax, 0);
        assert_eq!(find(&c, 0x4000_0000, 0).eax, 0x4000_0001);
    }

    #[test]
    fn amd_core_count() {
        let mut c = CpuId::from_entries(&[
            vendor_leaf(b"AuthenticAMD"),
            entry(0x8000_0008, 0, 0x3030, 0, 0, 0),
        ])
        .unwrap();
        patch_cpuid(
            &mut c,
            VcpuTopology {
                index: 1,
                count: 4,
                tsc_deadline: false,
            },
        )
        .unwrap();
        let e = find(&c, 0x8000_0008, 0);
        assert_eq!(e.ecx & 0xff, 3);
        assert_eq!((e.ecx >> 12) & 0xf, 2);
    }
}
