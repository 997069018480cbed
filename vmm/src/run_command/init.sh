#!/bin/busybox sh
# Init of the initramfs `evmm run` generates: mounts the host's share (virtio-fs, tag
# evmm-root) as the root, with a tmpfs overlay over a read-only share, runs the command
# of /etc/evmm-run/command in the host's directory there, and writes its status to the
# exit device (I/O port 0xf4), which makes it evmm's exit status.
/bin/busybox mkdir -p /sbin /usr/bin /usr/sbin /proc /sys /dev /mnt/share /mnt/rw /newroot
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
# The command's output goes to the console as it is: no CR added before LF, no echo.
stty -opost -echo 2>/dev/null

# report STATUS: the status to the exit device, then power off (if still running).
report() {
    printf "\\$(printf %03o "$(($1 & 255))")" | dd of=/dev/port bs=1 seek=244 count=1 2>/dev/null
    poweroff -f
}
# fail MESSAGE: one error line, status 1.
fail() {
    echo "error: $*" >&2
    report 1
}

. /etc/evmm-run/config
if [ -f /etc/evmm/modules ]; then
    while read -r module; do
        insmod "/lib/modules/$module" 2>/dev/null
    done < /etc/evmm/modules
fi
grep -qw virtiofs /proc/filesystems ||
    fail "the kernel $(uname -r) has no virtio-fs (CONFIG_VIRTIO_FS): not built in, and no virtiofs module for it was found"
if [ "$share_ro" = 1 ]; then
    mount -t virtiofs -o ro evmm-root /mnt/share || fail "cannot mount the share (virtio-fs tag evmm-root)"
    grep -qw overlay /proc/filesystems ||
        fail "the kernel $(uname -r) has no overlayfs (CONFIG_OVERLAY_FS), which a read-only share needs"
    mount -t tmpfs -o mode=0755 tmpfs /mnt/rw
    mkdir -p /mnt/rw/upper /mnt/rw/work
    mount -t overlay -o lowerdir=/mnt/share,upperdir=/mnt/rw/upper,workdir=/mnt/rw/work overlay /newroot ||
        fail "cannot mount the tmpfs overlay over the share"
else
    mount -t virtiofs evmm-root /newroot || fail "cannot mount the share (virtio-fs tag evmm-root)"
fi
# /tmp stays the share's (under the overlay when read-only): host files there are visible.
for fs in proc:proc sysfs:sys devtmpfs:dev tmpfs:run; do
    [ -d "/newroot/${fs#*:}" ] && mount -t "${fs%:*}" "${fs%:*}" "/newroot/${fs#*:}"
done
[ -x /newroot/bin/sh ] || fail "the share has no /bin/sh to run the command with"
chroot /newroot /bin/sh -c 'cd "$1" 2>/dev/null || cd /; shift; exec "$@"' evmm-run "$cwd" "$@" < /dev/null
status=$?
sync
report "$status"
