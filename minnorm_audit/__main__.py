from minnorm_audit.cli import main

main()
