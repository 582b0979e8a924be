# Bash completion for vdiskfs. Source this file, or copy it to
# /usr/share/bash-completion/completions/vdiskfs.
#
# Commands and options are read from `vdiskfs --help` and `vdiskfs COMMAND --help` the first
# time they are needed and then kept for the shell session, so they always match the
# installed version.

_vdiskfs_commands=""
declare -A _vdiskfs_options

_vdiskfs_help_commands() {
    # The help lists each command on a line of its own, indented by four spaces.
    vdiskfs --help 2>/dev/null | sed -n 's/^    \([a-z][a-z-]*\) .*/\1/p' | tr '\n' ' '
}

_vdiskfs_help_options() {
    vdiskfs "$1" --help 2>/dev/null | grep -o -- '\(^\|[ ,[]\)--\?[A-Za-z][A-Za-z-]*' \
        | sed 's/^[ ,[]*//' | sort -u | tr '\n' ' '
}

_vdiskfs() {
    local current=${COMP_WORDS[COMP_CWORD]}
    local previous=${COMP_WORDS[COMP_CWORD-1]}

    if [ "$COMP_CWORD" -eq 1 ]; then
        [ -n "$_vdiskfs_commands" ] || _vdiskfs_commands=$(_vdiskfs_help_commands)
        mapfile -t COMPREPLY < <(compgen -W "$_vdiskfs_commands --help --version" -- "$current")
        return
    fi

    local command=${COMP_WORDS[1]}
    case $previous in
        -f|--format|-F)
            if [ "$command" != mount ] || [ "$previous" != -f ]; then
                mapfile -t COMPREPLY < <(compgen -W "qcow2 raw" -- "$current")
                return
            fi
            ;;
        --output)
            mapfile -t COMPREPLY < <(compgen -W "human json" -- "$current")
            return
            ;;
        -o|--cache-size|--snapshot|-l|-c|-d|-a)
            return
            ;;
    esac

    if [[ $current == -* ]]; then
        if [ -z "${_vdiskfs_options[$command]+set}" ]; then
            _vdiskfs_options[$command]=$(_vdiskfs_help_options "$command")
        fi
        mapfile -t COMPREPLY < <(compgen -W "${_vdiskfs_options[$command]}" -- "$current")
        return
    fi

    case $command in
        umount)
            # Offer the current vdiskfs mounts.
            mapfile -t COMPREPLY < <(compgen -W \
                "$(findmnt -n -l -t fuse.vdiskfs -o TARGET 2>/dev/null)" -- "$current")
            ;;
        *)
            mapfile -t COMPREPLY < <(compgen -f -- "$current")
            compopt -o filenames 2>/dev/null
            ;;
    esac
}

complete -F _vdiskfs vdiskfs
