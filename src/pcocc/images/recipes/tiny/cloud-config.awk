# cloud-config.awk: translate the #cloud-config subset understood by the tiny image
# into calls of shell functions defined by pcocc-init (POSIX awk: busybox awk, mawk).
#
# Understood keys:
#   hostname: NAME                  -> cc_hostname 'NAME'
#   fqdn: NAME                      -> cc_fqdn 'NAME'
#   ssh_authorized_keys: [list]     -> cc_key 'KEY'            (one call per key)
#   runcmd: [list]                  -> cc_runcmd 'SHELL LINE'  (strings as they are;
#                                      lists of words shell-quoted, as cloud-init does)
#   write_files: [list of mappings] -> cc_write_file PATH PERMS OWNER APPEND ENCODING CONTENT
#   mounts: [list of lists]         -> cc_mount DEV DIR FSTYPE OPTIONS
# Every other key is ignored.  Scalars may be plain, 'single' or "double" quoted
# (\n \t \" \\ escapes), or block scalars (| |- |+ > >-).  Sequences may be block
# sequences ("- x", also nested "- - x") or one-line flow sequences ([a, "b c"]).
# Multi-line flow collections and anchors are not supported.

function sq(s) { gsub(/'/, "'\\''", s); return "'" s "'" }
function trim(s) { sub(/^[ \t]+/, "", s); sub(/[ \t]+$/, "", s); return s }
function indent_of(s) { match(s, /^ */); return RLENGTH }
function warn(msg) { print "cc_warn " sq("user-data line " NR ": " msg) }

# the value of a scalar: quotes removed, escapes decoded, comments dropped
function unquote(s,   c, out, i, n) {
    s = trim(s)
    c = substr(s, 1, 1)
    if (c == "'") {
        out = ""; n = length(s)
        for (i = 2; i <= n; i++) {
            c = substr(s, i, 1)
            if (c == "'") {
                if (substr(s, i + 1, 1) == "'") { out = out "'"; i++ } else break
            } else out = out c
        }
        return out
    }
    if (c == "\"") {
        out = ""; n = length(s)
        for (i = 2; i <= n; i++) {
            c = substr(s, i, 1)
            if (c == "\"") break
            if (c == "\\" && i < n) {
                i++; c = substr(s, i, 1)
                if (c == "n") c = "\n"; else if (c == "t") c = "\t"
            }
            out = out c
        }
        return out
    }
    sub(/[ \t]+#.*$/, "", s)
    return s
}

# split a one-line flow sequence "[a, 'b', "c d"]" into arr[1..n]; returns n
function flow(s, arr,   n, i, c, q, cur, len) {
    s = trim(s); sub(/^\[/, "", s)
    n = 0; q = ""; cur = ""; len = length(s)
    for (i = 1; i <= len; i++) {
        c = substr(s, i, 1)
        if (q != "") {
            if (c == q) q = ""
            else if (c == "\\" && q == "\"") { cur = cur c; i++; c = substr(s, i, 1) }
        } else if (c == "'" || c == "\"") q = c
        else if (c == "," || c == "]") {
            if (trim(cur) != "") arr[++n] = unquote(cur)
            cur = ""
            if (c == "]") return n
            continue
        }
        cur = cur c
    }
    if (trim(cur) != "") arr[++n] = unquote(cur)
    return n
}

function is_block(v) { return v ~ /^[|>][-+]?[ \t]*(#.*)?$/ }

function start_block(v, parent, target) {
    blk = 1; bparent = parent; bind = -1; bn = 0; btarget = target
    bstyle = substr(v, 1, 1); bchomp = substr(v, 2, 1)
}

# one line of a block scalar: returns 1 when consumed, 0 when the block has ended
function block_line(l,   li) {
    if (l ~ /^[ \t]*$/) { blines[++bn] = ""; return 1 }
    li = indent_of(l)
    if (bind < 0) { if (li <= bparent) { end_block(); return 0 } ; bind = li }
    if (li < bind) { end_block(); return 0 }
    blines[++bn] = substr(l, bind + 1)
    return 1
}

function end_block(   last, i, v, sep) {
    blk = 0
    last = bn
    while (last > 0 && blines[last] == "") last--
    v = ""
    if (bstyle == "|") {
        for (i = 1; i <= last; i++) v = v (i > 1 ? "\n" : "") blines[i]
    } else {
        sep = ""
        for (i = 1; i <= last; i++) {
            if (blines[i] == "") { v = v "\n"; sep = "" }
            else { v = v sep blines[i]; sep = " " }
        }
    }
    if (bchomp == "+") { for (i = last; i <= bn; i++) v = v "\n" }
    else if (bchomp != "-" && last > 0) v = v "\n"
    if (btarget == "item") { istr = v; itype = "str" }
    else if (btarget ~ /^wf:/) wf[substr(btarget, 4)] = v
}

function reset_item() { itype = ""; istr = ""; iargc = 0; split("", wf) }

function set_wf(line, col,   k, v) {
    if (!match(line, /^[A-Za-z_-]+:([ \t]|$)/)) { warn("write_files: cannot parse: " line); return }
    k = substr(line, 1, index(line, ":") - 1)
    v = trim(substr(line, index(line, ":") + 1))
    itype = "wf"
    if (is_block(v)) start_block(v, col, "wf:" k)
    else wf[k] = unquote(v)
}

function item_start(rest, col,   n, i, a, pad) {
    reset_item()
    match(rest, /^ */); pad = RLENGTH
    rest = trim(rest)
    if (top == "write_files") {
        if (rest != "") set_wf(rest, col + 1 + pad)
        else itype = "wf"
        return
    }
    if (rest ~ /^\[/) {
        n = flow(rest, a); itype = "argv"
        for (i = 1; i <= n; i++) iargv[++iargc] = a[i]
    } else if (rest == "-" || rest ~ /^- /) {
        itype = "argv"
        if (rest != "-") iargv[++iargc] = unquote(substr(rest, 3))
    } else if (rest == "") {
        itype = "argv"
    } else if (is_block(rest)) {
        start_block(rest, col, "item")
    } else {
        itype = "str"; istr = unquote(rest)
    }
}

function item_more(line, ind) {
    if (top == "write_files") { set_wf(line, ind); return }
    if (itype == "argv" && line ~ /^-( |$)/) { iargv[++iargc] = unquote(substr(line, 2)); return }
    warn(top ": cannot parse: " line)
}

function end_item(   i, cmd) {
    if (itype == "") return
    if (top == "ssh_authorized_keys" && itype == "str") print "cc_key " sq(istr)
    else if (top == "runcmd") {
        if (itype == "str") print "cc_runcmd " sq(istr)
        else {
            cmd = ""
            for (i = 1; i <= iargc; i++) cmd = cmd (i > 1 ? " " : "") sq(iargv[i])
            if (cmd != "") print "cc_runcmd " sq(cmd)
        }
    } else if (top == "mounts" && itype == "argv") {
        print "cc_mount " sq(iargv[1]) " " sq(iargv[2]) " " sq(iargv[3]) " " sq(iargv[4])
    } else if (top == "write_files" && itype == "wf") {
        if (wf["path"] == "") warn("write_files entry without path")
        else print "cc_write_file " sq(wf["path"]) " " sq(wf["permissions"]) " " sq(wf["owner"]) " " \
            sq(wf["append"]) " " sq(wf["encoding"]) " " sq(wf["content"])
    } else warn(top ": unexpected item")
    reset_item()
}

function top_key(line,   k, v, n, i, a) {
    k = substr(line, 1, index(line, ":") - 1)
    v = trim(substr(line, index(line, ":") + 1))
    top = k; iind = -1
    if (is_block(v)) { start_block(v, 0, "ignored"); return }
    if (v ~ /^\[/ && (k == "ssh_authorized_keys" || k == "runcmd")) {
        n = flow(v, a)
        for (i = 1; i <= n; i++) print (k == "runcmd" ? "cc_runcmd " : "cc_key ") sq(a[i])
        return
    }
    if (k == "hostname") print "cc_hostname " sq(unquote(v))
    else if (k == "fqdn") print "cc_fqdn " sq(unquote(v))
}

BEGIN {
    top = ""; iind = -1; blk = 0; reset_item()
    known["runcmd"] = known["ssh_authorized_keys"] = known["write_files"] = known["mounts"] = 1
}
{ sub(/\r$/, "") }
blk && block_line($0) { next }
/^[ \t]*(#.*)?$/ { next }
{
    ind = indent_of($0); line = substr($0, ind + 1)
    if (ind == 0 && line !~ /^-( |$)/) {
        end_item(); top = ""
        if (line ~ /^[^ :#][^:]*:([ \t]|$)/) top_key(line)
        else if (line !~ /^---/) warn("cannot parse: " line)
        next
    }
    if (!(top in known)) next
    if (line ~ /^-( |$)/ && (iind < 0 || ind == iind)) {
        end_item(); iind = ind
        item_start(substr(line, 2), ind)
        next
    }
    if (iind >= 0 && ind > iind) item_more(line, ind)
}
END { if (blk) end_block(); end_item() }
