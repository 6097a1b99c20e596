fn main() -> std::process::ExitCode {
    grenache_host::cli::main()
}
