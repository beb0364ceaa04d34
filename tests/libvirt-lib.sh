# shellcheck shell=bash
# A private libvirtd for interop tests; source after functions.sh.
#
#   libvirt_start IMGDIR
#
# As root, libvirtd would be the system instance (/run/libvirt, shared
# with everything else on the machine); as another user (nobody) it is a
# session daemon that keeps all its state under XDG_* in $TMPD/lv, and the
# QEMU it starts runs as that user too: $TMPD must be traversable and
# IMGDIR (created here) owned by it -- chown the images made in it with
# libvirt_own.  No virtlogd: QEMU logs straight to a file.  virsh's own
# files stay in $TMPD too.
#
# Sets LV (the daemon's directory), LV_PID (registered with cleanup_pid),
# LV_SOCK (its socket: qemu:///session?socket=$LV_SOCK; virtnbdbackup
# needs that plain qemu:// form, a qemu+unix:// one makes it ask for a
# user and password) and LV_ASUSER (the setpriv prefix, empty when not
# root).  Fails the test when the daemon does not answer.
libvirt_start() {
    local img=$1
    LV=$TMPD/lv
    mkdir -p "$LV"/{home,cfg/libvirt,cache,run} "$img"
    printf '# no virtlogd: QEMU logs straight to a file\nstdio_handler = "file"\n' \
        >"$LV/cfg/libvirt/qemu.conf"
    LV_ASUSER=()
    if [[ $(id -u) -eq 0 ]]; then
        chmod 0711 "$TMPD"
        chown -R 65534:65534 "$LV" "$img"
        LV_ASUSER=(setpriv --reuid=65534 --regid=65534 --clear-groups)
        "${LV_ASUSER[@]}" test -w "$LV/run" ||
            fail "user nobody cannot reach $TMPD (a parent directory of \$TMPDIR is closed to it)"
    fi
    env -i PATH="$PATH" HOME="$LV/home" XDG_CONFIG_HOME="$LV/cfg" \
        XDG_CACHE_HOME="$LV/cache" XDG_RUNTIME_DIR="$LV/run" \
        "${LV_ASUSER[@]}" libvirtd >"$TMPD/libvirtd.log" 2>&1 </dev/null &
    LV_PID=$!
    cleanup_pid "$LV_PID"
    LV_SOCK=$LV/run/libvirt/libvirt-sock
    export XDG_CONFIG_HOME=$TMPD/virsh-cfg XDG_CACHE_HOME=$TMPD/virsh-cache
    wait_until -p "$LV_PID" -- _libvirt_answers ||
        fail "the private libvirtd does not answer: $(tail -n 5 "$TMPD/libvirtd.log")"
}

_libvirt_answers() {
    virsh -q -c "qemu:///session?socket=$LV_SOCK" uri >/dev/null 2>&1
}

# libvirt_own FILE...: hand files to the daemon's user (when root).
libvirt_own() {
    [[ ${#LV_ASUSER[@]} -eq 0 ]] || chown 65534:65534 "$@"
}
