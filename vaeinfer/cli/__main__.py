from vaeinfer.cli import main

main()
