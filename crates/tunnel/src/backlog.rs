//! How far behind the reading of a UDP socket is, as the kernel counts it.
//!
//! A hub's QUIC endpoint reads its one UDP socket in a task that shares the runtime
//! with everything else the hub does, and quinn bounds each of its turns (50 µs of
//! reading, then it yields). When the rest of the hub's work grows (a burst of
//! placements), the turns come less often, datagrams wait in the kernel, and once the
//! socket's buffer is full they are dropped, heartbeats among them: a hundred
//! thousand edges then time out together. The runtime's timers can stay on time
//! meanwhile (the hub's lag gauge saw nothing), so the socket itself is asked: the
//! bytes it holds unread and the datagrams it dropped (`/proc/net/udp`, the socket
//! found by its inode).

use std::net::UdpSocket;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;

/// What a UDP socket holds unread and what it lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Backlog {
    /// Bytes queued for the reader (the kernel's accounting, which counts each
    /// datagram's buffer, not just its payload).
    pub queued: u64,
    /// Datagrams dropped since the socket was opened (its buffer was full).
    pub drops: u64,
}

/// A UDP socket to read the backlog of.
#[derive(Debug, Clone)]
pub struct SocketWatch {
    inode: u64,
    table: &'static str,
    buffer: u64,
}

impl SocketWatch {
    /// Watch `socket` (before it is handed to the endpoint that reads it).
    pub fn of(socket: &UdpSocket) -> std::io::Result<Self> {
        let inode = std::fs::metadata(format!("/proc/self/fd/{}", socket.as_raw_fd()))?.ino();
        let table = if socket.local_addr()?.is_ipv4() {
            "/proc/net/udp"
        } else {
            "/proc/net/udp6"
        };
        // As the kernel reports it: twice what was asked, the same accounting as
        // the queue's.
        let buffer = rustix::net::sockopt::socket_recv_buffer_size(socket)? as u64;
        Ok(Self {
            inode,
            table,
            buffer,
        })
    }

    /// The socket's receive buffer, in the units of [`Backlog::queued`].
    pub fn buffer(&self) -> u64 {
        self.buffer
    }

    /// The backlog now; `None` if the kernel does not list the socket (closed, or no
    /// `/proc`).
    pub fn read(&self) -> Option<Backlog> {
        let table = std::fs::read_to_string(self.table).ok()?;
        parse_table(&table, self.inode)
    }
}

/// The backlog of the socket with `inode` in a `/proc/net/udp` table:
///
/// ```text
///   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
///  123: 00000000:1F90 00000000:0000 07 00000000:00001200 00:00000000 00000000     0        0 41234 2 0000000000000000 17
/// ```
fn parse_table(table: &str, inode: u64) -> Option<Backlog> {
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.get(9)?.parse::<u64>().ok()? != inode {
            return None;
        }
        let (_, rx) = fields.get(4)?.split_once(':')?;
        Some(Backlog {
            queued: u64::from_str_radix(rx, 16).ok()?,
            drops: fields.get(12)?.parse().ok()?,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &str = "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
  113: 0100007F:A3C1 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 90012 2 0000000000000000 0
  560: 00000000:8DCF 00000000:0000 07 00000000:00012C00 00:00000000 00000000     0        0 88411 2 0000000000000000 4096
";

    #[test]
    fn the_socket_is_found_by_its_inode_and_its_queue_read_in_hex() {
        assert_eq!(
            parse_table(TABLE, 88411),
            Some(Backlog {
                queued: 0x12C00,
                drops: 4096
            })
        );
        assert_eq!(parse_table(TABLE, 90012), Some(Backlog::default()));
        assert_eq!(parse_table(TABLE, 1), None);
        assert_eq!(parse_table("garbage\n1: 2 3", 1), None);
    }

    #[test]
    fn a_socket_left_unread_shows_its_queue_then_its_drops() {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        rustix::net::sockopt::set_socket_recv_buffer_size(&rx, 4096).unwrap();
        let watch = SocketWatch::of(&rx).unwrap();
        assert_eq!(watch.read(), Some(Backlog::default()));
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        tx.send_to(&[7; 100], rx.local_addr().unwrap()).unwrap();
        let one = watch.read().unwrap();
        assert!(one.queued > 0 && one.drops == 0, "{one:?}");
        // Far more than the buffer holds: the rest is dropped, and counted.
        for _ in 0..200 {
            tx.send_to(&[7; 100], rx.local_addr().unwrap()).unwrap();
        }
        let full = watch.read().unwrap();
        assert!(
            full.queued <= watch.buffer() * 2,
            "{full:?} {}",
            watch.buffer()
        );
        assert!(full.drops > 0, "{full:?}");
        // Read, the queue empties; the drops stay counted.
        let mut buf = [0; 200];
        rx.set_nonblocking(true).unwrap();
        while rx.recv(&mut buf).is_ok() {}
        let read = watch.read().unwrap();
        assert_eq!(read.queued, 0);
        assert_eq!(read.drops, full.drops);
    }
}
