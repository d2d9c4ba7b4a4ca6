pub mod cpuid;
