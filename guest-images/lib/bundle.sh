# Shell functions shared by guest-images/build: filesystem trees for initramfs images.
# Sourced, not run.

# new_root DIR: an empty merged-/usr tree (bin, sbin, lib, lib64 point into usr/).
new_root() {
    local root=$1
    rm -rf "$root"
    mkdir -p "$root"/{usr/bin,usr/sbin,usr/lib,usr/lib64,dev,proc,sys,tmp,run,etc,root,mnt}
    ln -s usr/bin "$root/bin"
    ln -s usr/sbin "$root/sbin"
    ln -s usr/lib "$root/lib"
    ln -s usr/lib64 "$root/lib64"
}

# install_busybox ROOT: the static busybox and a link for each of its applets.
install_busybox() {
    local root=$1 applet
    cp /bin/busybox "$root/usr/bin/busybox"
    for applet in $(/bin/busybox --list); do
        [ -e "$root/usr/bin/$applet" ] || ln -s busybox "$root/usr/bin/$applet"
    done
}

# bundle_elf ROOT PATH...: copies each executable to the same path under ROOT, with
# every shared library it loads (from ldd) and the dynamic loader. An executable at
# the path of a busybox applet's link replaces the link (install unlinks it first):
# that is how iproute2's /usr/bin/ip takes the place of busybox's.
bundle_elf() {
    local root=$1 exe lib
    shift
    for exe in "$@"; do
        [ -x "$exe" ] || die "cannot bundle $exe: not an executable on this machine (is its package installed?)"
        install -D -m 0755 "$exe" "$root$exe"
        # ldd prints "name => /path (addr)" or "/path (addr)"; statically linked files print no paths.
        for lib in $(ldd "$exe" 2>/dev/null | grep -o '/[^ ]*'); do
            [ -e "$root$lib" ] || install -D -m 0755 "$(readlink -f "$lib")" "$root$lib"
        done
    done
}

# bundle_data ROOT DIR...: copies data directories to the same path, symlinks resolved.
bundle_data() {
    local root=$1 dir
    shift
    for dir in "$@"; do
        [ -d "$dir" ] || die "cannot bundle $dir: no such directory (is its package installed?)"
        mkdir -p "$root$dir"
        cp -rL "$dir/." "$root$dir/"
    done
}

# module_closure MODDIR NAME...: prints the module files (relative to MODDIR) that
# loading NAME... needs, dependencies first, each once. Fails on an unknown name.
module_closure() {
    local moddir=$1
    shift
    awk -v want="$*" '
        function base(p) { sub(/.*\//, "", p); sub(/\.ko(\.[a-z]+)?$/, "", p); gsub(/-/, "_", p); return p }
        function visit(m,   i, n, d) {
            if (m in seen) return
            seen[m] = 1
            n = split(deps[m], d, " ")
            for (i = n; i >= 1; i--) visit(d[i])
            print m
        }
        {
            sub(/:$/, "", $1); mod = $1; path[base(mod)] = mod; deps[mod] = ""
            for (i = 2; i <= NF; i++) deps[mod] = deps[mod] " " $i
        }
        END {
            n = split(want, w, " ")
            for (i = 1; i <= n; i++) {
                k = w[i]; gsub(/-/, "_", k)
                if (!(k in path)) { print "unknown module " w[i] > "/dev/stderr"; exit 1 }
                visit(path[k])
            }
        }' "$moddir/modules.dep"
}

# install_modules ROOT MODDIR NAME...: copies NAME... and their dependencies to
# ROOT/lib/modules and writes the load order to ROOT/etc/evmm/modules.
install_modules() {
    local root=$1 moddir=$2 order m
    shift 2
    order=$(module_closure "$moddir" "$@") || die "module list of $* could not be resolved from $moddir/modules.dep"
    mkdir -p "$root/etc/evmm"
    : > "$root/etc/evmm/modules"
    for m in $order; do
        install -D -m 0644 "$moddir/$m" "$root/lib/modules/$m"
        echo "$m" >> "$root/etc/evmm/modules"
    done
}

# pack_cpio ROOT OUT [gzip]: a newc archive of ROOT (files sorted, owned by root).
pack_cpio() {
    local root=$1 out=$2 compress=${3:-}
    (
        cd "$root"
        if [ "$compress" = gzip ]; then
            find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0 --reproducible | gzip -6 -n > "$out.tmp"
        else
            find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0 --reproducible > "$out.tmp"
        fi
    ) || die "packing $out failed"
    mv "$out.tmp" "$out"
}
