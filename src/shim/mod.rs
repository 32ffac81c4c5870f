pub mod hypervisor;
