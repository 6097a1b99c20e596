//! The host's RPC socket, registered with the runtime for reading only.
//!
//! A UDP socket that the runtime watches for writability wakes it after
//! every datagram sent (Linux signals `EPOLLOUT` each time a sent datagram's
//! buffer is freed), one more `epoll_wait` per reply for nothing: measured
//! with `perf trace` on a host answering one request at a time, each reply's
//! `sendto` was followed by an `epoll_wait` returning at once. Sends here go
//! straight to the kernel without waiting; only when its send buffer is full
//! does a send wait for room, on a registration made for that wait alone.
//!
//! Reads take up to [`RECV_AT_ONCE`] datagrams per call (`recvmmsg`); a call
//! that finds fewer has emptied the queue, so the readiness is cleared then
//! instead of by one more call that fails with `EAGAIN` (the same trace: two
//! `recvfrom` per request, the second empty).

use std::io;
use std::net::SocketAddr;

use std::os::fd::AsRawFd;

use tokio::io::unix::{AsyncFd, AsyncFdReadyGuard};
use tokio::io::{Interest, Ready};

/// A bound, non-blocking UDP socket: reads by readiness, sends at once.
#[derive(Debug)]
pub(super) struct RpcSocket {
    fd: AsyncFd<std::net::UdpSocket>,
}

impl RpcSocket {
    /// Registers `socket` (non-blocking) for reading and errors.
    pub fn new(socket: std::net::UdpSocket) -> io::Result<RpcSocket> {
        socket.set_nonblocking(true)?;
        Ok(RpcSocket {
            fd: register(socket, Interest::READABLE | Interest::ERROR)?,
        })
    }

    /// The socket itself, for options and the error queue.
    pub fn get_ref(&self) -> &std::net::UdpSocket {
        self.fd.get_ref()
    }

    /// Waits until a datagram or an error is waiting; the guard says which
    /// ([`Ready`]) and goes to [`recv_many`](Self::recv_many).
    pub async fn ready(&self) -> io::Result<AsyncFdReadyGuard<'_, std::net::UdpSocket>> {
        self.fd.ready(Interest::READABLE | Interest::ERROR).await
    }

    /// Reads the datagrams waiting, up to [`RECV_AT_ONCE`], into `into`;
    /// `Ok(0)` when none was. Fewer than asked for means the queue is
    /// empty: `ready`'s readiness is cleared then (a datagram arriving later
    /// is reported by the next wait).
    pub fn recv_many(
        &self,
        ready: &mut AsyncFdReadyGuard<'_, std::net::UdpSocket>,
        into: &mut Received,
    ) -> io::Result<usize> {
        let got = match recvmmsg(self.fd.get_ref(), into) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            other => other?,
        };
        if got < RECV_AT_ONCE {
            ready.clear_ready_matching(Ready::READABLE);
        }
        Ok(got)
    }

    /// Runs `read` on the socket's error queue; `WouldBlock` from `read`
    /// clears the error readiness.
    pub fn try_read_errors<R>(
        &self,
        read: impl FnOnce(&std::net::UdpSocket) -> io::Result<R>,
    ) -> io::Result<R> {
        self.fd.try_io(Interest::ERROR, read)
    }

    /// Hands `datagram` to the kernel without waiting: `WouldBlock` when the
    /// send buffer is full.
    ///
    /// With `IP_RECVERR` (set at bind) an ICMP error for an earlier datagram
    /// (a peer's closed port) is also left pending on the socket, and Linux
    /// reports it on the next send, whatever its destination, without sending
    /// that datagram (`sock_alloc_send_pskb` returns the pending `sk_err`). A
    /// host whose old callers went away would then drop replies to live ones
    /// (seen in the fault test: "uTP packet not sent: Connection refused" to
    /// a caller that was waiting), and anyone who knows the host's address
    /// could drop its next datagram with one forged ICMP message (the kernel
    /// matches the quoted header, not the sender): every ICMP code maps to
    /// some errno (port unreachable `ECONNREFUSED`, protocol unreachable
    /// `ENOPROTOOPT`, source route failed `EOPNOTSUPP`, …). So any error but
    /// `WouldBlock` is taken as consumed and the datagram sent again, up to
    /// [`SEND_ATTEMPTS`] times: a pending error is reported once, while an
    /// error about this datagram itself comes back each time and is returned.
    /// The ICMP errors still reach the host through the error queue.
    pub fn try_send_to(&self, datagram: &[u8], to: SocketAddr) -> io::Result<usize> {
        let mut attempt = 1;
        loop {
            match self.fd.get_ref().send_to(datagram, to) {
                Err(e) if attempt < SEND_ATTEMPTS && e.kind() != io::ErrorKind::WouldBlock => {
                    tracing::trace!(%to, "a send failed ({e}), maybe with an earlier datagram's error; sending again");
                    attempt += 1;
                }
                sent => return sent,
            }
        }
    }

    /// Sends `datagram`, waiting for room in the send buffer if it is full.
    pub async fn send_to(&self, datagram: &[u8], to: SocketAddr) -> io::Result<usize> {
        loop {
            match self.try_send_to(datagram, to) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.writable().await?,
                sent => return sent,
            }
        }
    }

    /// Resolves when the send buffer has room: the socket registered a
    /// second time, for writability, for as long as this waits.
    async fn writable(&self) -> io::Result<()> {
        let watch = register(self.fd.get_ref().try_clone()?, Interest::WRITABLE)?;
        let _ready = watch.writable().await?;
        Ok(())
    }
}

/// Sends one datagram tries at most when its sends fail (pending errors of
/// earlier datagrams are reported once each; see [`RpcSocket::try_send_to`]).
pub(super) const SEND_ATTEMPTS: u32 = 8;

/// `socket` registered with the runtime for `interest`.
fn register(
    socket: std::net::UdpSocket,
    interest: Interest,
) -> io::Result<AsyncFd<std::net::UdpSocket>> {
    // SAFETY: the `UdpSocket` owns its descriptor and keeps it open until it
    // is dropped, which the `AsyncFd` that owns it does last; nothing here
    // replaces the socket or closes its descriptor meanwhile.
    unsafe { AsyncFd::register_with_interest(socket, interest) }.map_err(|e| e.into_parts().1)
}

/// Datagrams [`RpcSocket::recv_many`] reads in one call at most.
pub(super) const RECV_AT_ONCE: usize = 8;

/// Room for [`RECV_AT_ONCE`] datagrams of any size (64 KiB each, allocated
/// once per socket; only the bytes received are touched) and their senders.
pub(super) struct Received {
    bufs: Vec<Box<[u8]>>,
    lens: [usize; RECV_AT_ONCE],
    from: [Option<SocketAddr>; RECV_AT_ONCE],
}

impl Received {
    /// Empty buffers of `size` bytes each.
    pub fn new(size: usize) -> Received {
        Received {
            bufs: (0..RECV_AT_ONCE)
                .map(|_| vec![0u8; size].into_boxed_slice())
                .collect(),
            lens: [0; RECV_AT_ONCE],
            from: [None; RECV_AT_ONCE],
        }
    }

    /// The `i`th datagram of the last read and its sender (`None` for an
    /// address family other than IPv4 and IPv6).
    pub fn get(&self, i: usize) -> (Option<SocketAddr>, &[u8]) {
        (self.from[i], &self.bufs[i][..self.lens[i]])
    }
}

/// One `recvmmsg(MSG_DONTWAIT)` into `into`: how many datagrams it read.
fn recvmmsg(socket: &std::net::UdpSocket, into: &mut Received) -> io::Result<usize> {
    // SAFETY: all-zero is a valid sockaddr_storage and mmsghdr.
    let mut names: [libc::sockaddr_storage; RECV_AT_ONCE] = unsafe { std::mem::zeroed() };
    let mut iovs: [libc::iovec; RECV_AT_ONCE] = std::array::from_fn(|i| libc::iovec {
        iov_base: into.bufs[i].as_mut_ptr().cast(),
        iov_len: into.bufs[i].len(),
    });
    // SAFETY: as above.
    let mut headers: [libc::mmsghdr; RECV_AT_ONCE] = unsafe { std::mem::zeroed() };
    for (i, header) in headers.iter_mut().enumerate() {
        header.msg_hdr.msg_name = (&mut names[i] as *mut libc::sockaddr_storage).cast();
        header.msg_hdr.msg_namelen =
            std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        header.msg_hdr.msg_iov = &mut iovs[i];
        header.msg_hdr.msg_iovlen = 1;
    }
    // SAFETY: a valid descriptor; every header points at its own name and
    // one iovec over a live buffer of the length given, all outliving the call.
    let n = unsafe {
        libc::recvmmsg(
            socket.as_raw_fd(),
            headers.as_mut_ptr(),
            RECV_AT_ONCE as libc::c_uint,
            libc::MSG_DONTWAIT,
            std::ptr::null_mut(),
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = n as usize;
    for i in 0..n {
        into.lens[i] = headers[i].msg_len as usize;
        into.from[i] = super::icmp::socket_addr(&names[i]);
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Waits (2 s at most) for `socket` to be ready and reads what is there.
    async fn read(socket: &RpcSocket, into: &mut Received) -> usize {
        let mut ready = tokio::time::timeout(Duration::from_secs(2), socket.ready())
            .await
            .expect("ready within 2 s")
            .unwrap();
        socket.recv_many(&mut ready, into).unwrap()
    }

    #[tokio::test]
    async fn queued_datagrams_come_in_batches_and_a_later_one_still_wakes_the_reader() {
        let socket = RpcSocket::new(std::net::UdpSocket::bind("127.0.0.1:0").unwrap()).unwrap();
        let to = socket.get_ref().local_addr().unwrap();
        let sender = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut into = Received::new(65_536);
        for i in 0..20u8 {
            sender.send_to(&[i; 3], to).unwrap();
        }
        // 20 waiting: 8, 8, then 4 (fewer than asked: the queue is empty).
        let mut seen = Vec::new();
        for expected in [8, 8, 4] {
            assert_eq!(read(&socket, &mut into).await, expected);
            for i in 0..expected {
                let (from, datagram) = into.get(i);
                assert_eq!(from, Some(sender.local_addr().unwrap()));
                seen.push(datagram.to_vec());
            }
        }
        assert_eq!(seen, (0..20u8).map(|i| vec![i; 3]).collect::<Vec<_>>());
        // The readiness was cleared by the short read, and one datagram
        // sent afterwards is reported by the next wait, even the largest.
        let large = vec![7u8; 65_507];
        sender.send_to(&large, to).unwrap();
        assert_eq!(read(&socket, &mut into).await, 1);
        assert_eq!(into.get(0).1, &large[..]);
        // Nothing waiting: no readiness.
        let idle = tokio::time::timeout(Duration::from_millis(100), socket.ready()).await;
        assert!(idle.is_err(), "ready with nothing to read");
    }

    /// A host-like socket (`IP_RECVERR` on) and a live peer reading with a
    /// 2 s limit.
    fn socket_and_live_peer() -> (RpcSocket, std::net::UdpSocket) {
        let socket = RpcSocket::new(std::net::UdpSocket::bind("127.0.0.1:0").unwrap()).unwrap();
        super::super::icmp::enable(socket.get_ref()).unwrap();
        let live = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        live.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        (socket, live)
    }

    /// Waits for the error an ICMP message left on `socket` (`case` names
    /// it), then checks that the next datagram, `payload` to `live`, is not
    /// taken by it and arrives.
    async fn the_next_send_arrives(
        socket: &RpcSocket,
        live: &std::net::UdpSocket,
        payload: &[u8],
        case: &str,
    ) {
        let ready = tokio::time::timeout(Duration::from_secs(2), socket.ready())
            .await
            .expect("the ICMP error arrives")
            .unwrap();
        assert!(ready.ready().is_error(), "{case}");
        drop(ready);
        // Not read from the error queue: the next send meets it.
        let to = live.local_addr().unwrap();
        assert_eq!(
            socket.try_send_to(payload, to).unwrap(),
            payload.len(),
            "{case}"
        );
        let mut buf = [0u8; 16];
        let (n, _) = live
            .recv_from(&mut buf)
            .expect("the live peer gets its datagram");
        assert_eq!(&buf[..n], payload, "{case}");
    }

    #[tokio::test]
    async fn a_closed_ports_icmp_error_does_not_take_the_next_datagram_to_a_live_peer() {
        let (socket, live) = socket_and_live_peer();
        let closed = std::net::UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        for round in 0..3u8 {
            // The port is closed: the kernel answers with ICMP port
            // unreachable, which leaves an error pending on the socket.
            socket.try_send_to(b"to nobody", closed).unwrap();
            the_next_send_arrives(&socket, &live, &[round; 5], &format!("round {round}")).await;
            // The error still reaches the host through the error queue.
            let unreachable = socket
                .try_read_errors(super::super::icmp::next_error)
                .expect("queued");
            assert_eq!(unreachable.map(|u| u.0), Some(closed));
        }
    }

    /// The Internet checksum (RFC 1071) of `bytes`.
    fn checksum(bytes: &[u8]) -> u16 {
        let mut sum: u32 = bytes
            .chunks(2)
            .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
            .sum();
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }

    /// An ICMP destination unreachable with `code`, quoting a UDP datagram
    /// from 127.0.0.1:`port` to 127.0.0.1:9, as anyone could send it.
    fn forged_unreachable(port: u16, code: u8) -> Vec<u8> {
        let mut ip = vec![0x45, 0, 0, 48, 0x12, 0x34, 0, 0, 64, 17, 0, 0];
        ip.extend_from_slice(&[127, 0, 0, 1, 127, 0, 0, 1]);
        let sum = checksum(&ip);
        ip[10..12].copy_from_slice(&sum.to_be_bytes());
        let mut icmp = vec![3, code, 0, 0, 0, 0, 0, 0];
        icmp.extend_from_slice(&ip);
        icmp.extend_from_slice(&port.to_be_bytes());
        icmp.extend_from_slice(&[0, 9, 0, 28, 0, 0]);
        icmp.extend_from_slice(&[0; 20]);
        let sum = checksum(&icmp);
        icmp[2..4].copy_from_slice(&sum.to_be_bytes());
        icmp
    }

    #[tokio::test]
    async fn no_forged_icmp_code_takes_the_next_datagram() {
        // A raw ICMP socket needs root (CI runs as root and must run this).
        // SAFETY: plain socket(2); the descriptor is owned and closed below.
        let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP) };
        if raw < 0 {
            assert!(
                std::env::var_os("GRENACHE_REQUIRE_NAT_LAB").is_none(),
                "a raw socket is refused: run as root"
            );
            eprintln!("skipped: forging ICMP needs root");
            return;
        }
        // SAFETY: `raw` is a descriptor we own from here on.
        let raw = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) };
        let (socket, live) = socket_and_live_peer();
        let port = socket.get_ref().local_addr().unwrap().port();
        let loopback = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from(std::net::Ipv4Addr::LOCALHOST).to_be(),
            },
            sin_zero: [0; 8],
        };
        // Network, host, protocol, port unreachable, source route failed,
        // source host isolated, administratively prohibited.
        for code in [0u8, 1, 2, 3, 5, 8, 13] {
            let icmp = forged_unreachable(port, code);
            // SAFETY: a valid descriptor, buffer and address of the sizes given.
            let sent = unsafe {
                libc::sendto(
                    raw.as_raw_fd(),
                    icmp.as_ptr().cast(),
                    icmp.len(),
                    0,
                    (&loopback as *const libc::sockaddr_in).cast(),
                    std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
                )
            };
            assert_eq!(sent, icmp.len() as isize, "code {code}");
            the_next_send_arrives(&socket, &live, &[code; 3], &format!("code {code}")).await;
            while socket
                .try_read_errors(super::super::icmp::next_error)
                .is_ok()
            {}
        }
    }

    #[tokio::test]
    async fn sends_leave_at_once() {
        let socket = RpcSocket::new(std::net::UdpSocket::bind("127.0.0.1:0").unwrap()).unwrap();
        let receiver = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        receiver
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let to = receiver.local_addr().unwrap();
        assert_eq!(socket.try_send_to(b"now", to).unwrap(), 3);
        assert_eq!(socket.send_to(b"awaited", to).await.unwrap(), 7);
        let mut buf = [0u8; 16];
        for expected in [&b"now"[..], b"awaited"] {
            let (n, _) = receiver.recv_from(&mut buf).unwrap();
            assert_eq!(&buf[..n], expected);
        }
    }
}
