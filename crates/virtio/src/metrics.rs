//! Counters that a worker bumps while the VMM reads them, lock-free. Each device keeps
//! its own per-queue set (`blk::metrics`, ...).

use std::sync::atomic::{AtomicU64, Ordering};

/// A monotonically increasing counter.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    /// Adds one.
    pub fn inc(&self) {
        self.add(1);
    }
    /// The current value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Declares a struct of [`Counter`]s and its serializable snapshot with the same fields.
#[macro_export]
macro_rules! counters {
    ($(#[$m:meta])* $name:ident => $snap:ident { $($(#[$fm:meta])* $field:ident),* $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Default)]
        pub struct $name {
            $($(#[$fm])* pub $field: $crate::metrics::Counter,)*
        }

        #[doc = concat!("A point-in-time copy of [`", stringify!($name), "`], serialized as JSON.")]
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
        pub struct $snap {
            $($(#[$fm])* pub $field: u64,)*
        }

        impl $name {
            /// Reads every counter.
            pub fn snapshot(&self) -> $snap {
                $snap { $($field: self.$field.get(),)* }
            }
        }
    };
}
