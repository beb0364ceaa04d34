#!/bin/bash
# qcbt's usage errors are one line (issue 11): "qcbt: COMMAND: MESSAGE (see
# qcbt COMMAND --help)" on stderr, exit 1, never the whole help; a missing
# backup directory is the system's error, not "has no backups".
#
# Every command listed by 'qcbt --help' is tried with an unknown option,
# then each command's own mistakes: an invalid short option, a missing
# option argument (short and long), an argument to an option that takes
# none, an ambiguous abbreviation, bad values, and wrong positional
# arguments.  --help still prints the help on stdout and exits 0.
. "$(dirname "$0")/../functions.sh"

rc=0
# e NEEDLE... -- ARGS...: one case (expect_qcbt_error), counted.
e() {
    expect_qcbt_error "$@" || rc=1
}

# ---- every command --------------------------------------------------------
mapfile -t cmds < <("$QCBT" --help | awk '/^Commands:/ { on = 1; next } on && /^  [a-z]/ { print $1 } on && /^$/ { exit }')
[[ ${#cmds[@]} -ge 7 ]] || fail "qcbt --help lists ${#cmds[@]} commands: ${cmds[*]}"
for c in "${cmds[@]}"; do
    e "qcbt: $c: unrecognized option '--bogus'" "(see qcbt $c --help)" -- "$c" --bogus x
    e "qcbt: $c: invalid option -- 'Z'" "(see qcbt $c --help)" -- "$c" -Z x
    # --help still works, on stdout.
    out=$("$QCBT" "$c" --help 2>"$TMPD/help.err") || { note "qcbt $c --help failed"; rc=1; }
    [[ -s $TMPD/help.err ]] && { note "qcbt $c --help wrote to stderr"; rc=1; }
    [[ $out == *Usage:* ]] || { note "qcbt $c --help printed no usage"; rc=1; }
done

# ---- the command line itself ------------------------------------------------
e "qcbt: missing command" "(see qcbt --help)" --
e "qcbt: unknown command 'bogus'" "(see qcbt --help)" -- bogus
e "qcbt: unrecognized option '--bogus'" "(see qcbt --help)" -- --bogus
e "qcbt: help: unknown command 'nope'" -- help nope

# ---- image commands ---------------------------------------------------------
for c in info map cat; do
    e "qcbt: $c: option requires an argument -- 'f'" "(see qcbt $c --help)" -- "$c" -f
    e "qcbt: $c: option '--format' requires an argument" -- "$c" --format
    e "qcbt: $c: option '--format' requires an argument" -- "$c" --form
    e "qcbt: $c: option '--help' doesn't allow an argument" -- "$c" --help=yes
    e "qcbt: $c: expected exactly one IMAGE" "(see qcbt $c --help)" -- "$c"
    e "qcbt: $c: expected exactly one IMAGE" -- "$c" a b
done
e "qcbt: info: option '--json' doesn't allow an argument" -- info --json=1 x
e "qcbt: map: --output 'xml' is not json or human" "(see qcbt map --help)" -- map --output xml x
e "qcbt: cat: invalid --offset 'x'" "(see qcbt cat --help)" -- cat --offset x img
e "qcbt: cat: invalid --length '-1'" -- cat --length -1 img
e "qcbt: cat: option '--offset' requires an argument" -- cat --offset

e "qcbt: bitmap: expected a subcommand" "(see qcbt bitmap --help)" -- bitmap
e "qcbt: bitmap: unknown subcommand 'nope'" "(see qcbt bitmap --help)" -- bitmap nope img
for s in list check dump sha256; do
    e "qcbt: bitmap $s: unrecognized option '--bogus'" "(see qcbt bitmap --help)" -- bitmap "$s" --bogus img n
    e "qcbt: bitmap $s: invalid option -- 'Z'" -- bitmap "$s" -Z img n
done
e "qcbt: bitmap list: expected IMAGE" -- bitmap list
e "qcbt: bitmap check: expected IMAGE NAME" -- bitmap check img
e "qcbt: bitmap dump: expected IMAGE NAME" -- bitmap dump img n extra
e "qcbt: bitmap sha256: invalid --layer 'x'" -- bitmap sha256 --layer x img n
e "qcbt: bitmap sha256: option '--layer' requires an argument" -- bitmap sha256 img n --layer
e "qcbt: bitmap check: --layer is only for sha256" -- bitmap check --layer 1 img n

# ---- backup, restore, verify ------------------------------------------------
e "qcbt: backup: option '--since' requires an argument" "(see qcbt backup --help)" -- backup --since
e "qcbt: backup: expected URI DIR" "(see qcbt backup --help)" -- backup nbd://x
e "qcbt: backup: option '--json' doesn't allow an argument" -- backup --json=1 nbd://x D

e "qcbt: restore: option '--at' requires an argument" "(see qcbt restore --help)" -- restore D out --at
e "qcbt: restore: invalid --at 'x'" "(see qcbt restore --help)" -- restore --at x D out
e "qcbt: restore: output format 'vmdk' is not raw or qcow2" -- restore -O vmdk D out
e "qcbt: restore: option requires an argument -- 'O'" -- restore D out -O
e "qcbt: restore: expected DIR OUT" "(see qcbt restore --help)" -- restore D
e "qcbt: restore: expected DIR OUT" -- restore D out extra

e "qcbt: verify: option '--against' requires an argument" "(see qcbt verify --help)" -- verify D --against
e "qcbt: verify: option '--a' is ambiguous" -- verify --a 1 D
e "qcbt: verify: invalid --at '-1'" -- verify --at -1 D
e "qcbt: verify: expected DIR" "(see qcbt verify --help)" -- verify
e "qcbt: verify: --disk applies to a virtnbdbackup directory, and D is none" -- verify --disk vda D
e "qcbt: restore: --disk applies to a virtnbdbackup directory, and D is none" -- restore --disk vda D out

e "qcbt: import: expected VNBDIR DIR" "(see qcbt import --help)" -- import V
e "qcbt: import: expected VNBDIR DIR" -- import V D extra
e "qcbt: import: option '--disk' requires an argument" -- import V D --disk
e "qcbt: import: option '--json' doesn't allow an argument" -- import --json=1 V D
e "qcbt: verify: expected DIR" -- verify D1 D2

# A backup directory that is not there is the system's error, not "no
# backups"; a directory without a manifest has no backups.
: >"$TMPD/file"
mkdir "$TMPD/empty"
e "qcbt: $TMPD/nonexistent: No such file or directory" -- verify "$TMPD/nonexistent"
e "qcbt: $TMPD/nonexistent: No such file or directory" -- restore "$TMPD/nonexistent" "$TMPD/out.raw"
e "qcbt: $TMPD/file: Not a directory" -- verify "$TMPD/file"
e "qcbt: $TMPD/file: Not a directory" -- restore "$TMPD/file" "$TMPD/out.raw"
e "has no backups" -- verify "$TMPD/empty"
e "no backups" -- restore "$TMPD/empty" "$TMPD/out.raw"
[[ ! -e $TMPD/out.raw ]] || { note "a failed restore left $TMPD/out.raw"; rc=1; }

[[ $rc -eq 0 ]] || fail "some usage errors are not one line (see above)"
note "all usage errors are one line"
