//! The guest's network: eth0's address, the default route and resolv.conf, set from what the
//! host sends at every boot and restore (a clone must not keep its snapshot's identity).

use smolvm_proto::NetConfig;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

fn sockaddr(ip: [u8; 4]) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(ip) },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size and the kernel reads the family
    // field to interpret the rest; transmuting plain-old-data of equal size is sound.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

fn ifreq(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain old data; zeroed is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (i, b) in name.bytes().take(15).enumerate() {
        req.ifr_name[i] = b as libc::c_char;
    }
    req
}

fn check(r: libc::c_int, what: &str) -> io::Result<()> {
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EEXIST) {
            return Err(io::Error::new(e.kind(), format!("{what}: {e}")));
        }
    }
    Ok(())
}

fn socket() -> io::Result<OwnedFd> {
    use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};
    socket(AddressFamily::Inet, SockType::Datagram, SockFlag::SOCK_CLOEXEC, None).map_err(io::Error::from)
}

/// At boot, from `smolvm_net=` on the kernel command line, on the calling set-up thread.
pub fn configure_now(cfg: &NetConfig) {
    if let Err(e) = configure(cfg) {
        crate::log(&format!("network: {e}"));
    }
}

/// A restored guest's own settings, from the greeting. Bringing the NIC up costs milliseconds,
/// so it runs on a thread of its own; commands wait for it (`pending::wait`).
pub fn configure_in_background(cfg: NetConfig) {
    crate::pending::spawn(move || configure_now(&cfg));
}

fn configure(cfg: &NetConfig) -> io::Result<()> {
    if cfg.prefix > 32 {
        return Err(io::Error::other(format!("a /{} network prefix (0 to 32)", cfg.prefix)));
    }
    let sock = socket()?;
    let fd = sock.as_raw_fd();
    let mask = if cfg.prefix == 0 { 0 } else { u32::MAX << (32 - cfg.prefix as u32) };
    let mut req = ifreq("eth0");
    // SAFETY (all ioctls below): `fd` is an open socket; each request is a valid, initialised
    // ifreq or rtentry that outlives the call, of the type the request number expects.
    unsafe {
        req.ifr_ifru.ifru_addr = sockaddr(cfg.address);
        check(libc::ioctl(fd, libc::SIOCSIFADDR as _, &req), "setting the address")?;
        req.ifr_ifru.ifru_netmask = sockaddr(mask.to_be_bytes());
        check(libc::ioctl(fd, libc::SIOCSIFNETMASK as _, &req), "setting the netmask")?;
        let mut flags = ifreq("eth0");
        check(libc::ioctl(fd, libc::SIOCGIFFLAGS as _, &mut flags), "reading eth0")?;
        flags.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        check(libc::ioctl(fd, libc::SIOCSIFFLAGS as _, &flags), "bringing eth0 up")?;
        let mut route: libc::rtentry = std::mem::zeroed();
        route.rt_dst = sockaddr([0; 4]);
        route.rt_genmask = sockaddr([0; 4]);
        route.rt_gateway = sockaddr(cfg.gateway);
        route.rt_flags = (libc::RTF_UP | libc::RTF_GATEWAY) as _;
        // A restored guest may carry its template's default route: replace it.
        libc::ioctl(fd, libc::SIOCDELRT as _, &route);
        check(libc::ioctl(fd, libc::SIOCADDRT as _, &route), "adding the default route")?;
    }
    let [a, b, c, d] = cfg.dns;
    crate::init::replace_file("/etc/resolv.conf", format!("nameserver {a}.{b}.{c}.{d}\n").as_bytes())
}
